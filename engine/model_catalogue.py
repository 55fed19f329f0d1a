"""ModelCatalogue: the models an instance serves, added, removed, evicted and preloaded at run time.

Each model is on one tier (model_tiers.Tier): on disk, in the node's host cache, or
resident in an arena slot. Every operation checks its input first and changes nothing on
a bad one (CatalogueError, naming the id, folder or limit):

    add(id, folder)  a valid id (no path characters), not yet in the catalogue, a folder
                     holding a model whose weights fit an arena slot; only headers are read
    remove(id)       an id in the catalogue with no unfinished requests
    evict(id)        drop its host-cache copy (it stays in the catalogue, on disk)
    preload(id)      start reading it into the host cache; returns the load's ticket
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .cold_loader import LoadTicket
from .errors import ModelFolderError
from .host_model_cache import CacheMissError, ModelInUseError
from .model_tiers import Tier
from .multi_model_engine import MultiModelEngine

MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class CatalogueError(ValueError):
    """A catalogue operation was refused; nothing changed."""


@dataclass(frozen=True)
class CatalogueEntry:
    model_id: str
    folder: Path
    tier: Tier
    weight_bytes: int
    unfinished: int  # requests queued, running or swapped out on this instance
    loaded_bytes: int | None  # bytes read so far while a disk load runs, else None
    waiting_for_room: bool = False  # that load waits for host-cache room (cold_loader.py)


def check_model_id(model_id: str) -> str:
    if not MODEL_ID.fullmatch(model_id) or ".." in model_id:
        raise CatalogueError(f"model id {model_id!r} is not allowed: use 1-128 letters, digits, '.', '_' "
                             f"or '-', starting with a letter or digit (no '/' or '..')")
    return model_id


def scan_catalogue(root: Path) -> dict[str, Path]:
    """{folder name: folder} for every model folder (one with a config.json) directly under root."""
    if not Path(root).is_dir():
        raise CatalogueError(f"catalogue folder {root} does not exist")
    found = {p.name: p for p in sorted(Path(root).iterdir()) if (p / "config.json").is_file()}
    if not found:
        raise CatalogueError(f"catalogue folder {root} holds no model folder (none has a config.json)")
    for model_id in found:
        check_model_id(model_id)
    return found


class ModelCatalogue:
    def __init__(self, engine: MultiModelEngine) -> None:
        self.engine = engine

    def add(self, model_id: str, folder: Path) -> CatalogueEntry:
        check_model_id(model_id)
        if model_id in self.engine.models:
            raise CatalogueError(f"model id {model_id!r} is already in the catalogue "
                                 f"(folder {self.engine.models[model_id].profile.folder})")
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CatalogueError(f"folder {folder} is not a model: it has no config.json")
        try:
            self.engine.register(model_id, folder, lazy=True)
        except (ModelFolderError, MemoryError, ValueError, OSError) as exc:
            raise CatalogueError(f"model {model_id!r} from {folder}: {exc}") from exc
        return self.entry(model_id)

    def remove(self, model_id: str) -> None:
        self._known(model_id)
        try:
            self.engine.unregister(model_id)
        except ValueError as exc:
            raise CatalogueError(str(exc)) from exc
        try:  # its host-cache copy is of no more use
            self.engine.cache.evict(model_id)
        except (CacheMissError, ModelInUseError):
            pass  # not cached; or attached by another instance, which still serves it

    def evict(self, model_id: str) -> None:
        self._known(model_id)
        if self.engine.has_unfinished(model_id):
            raise CatalogueError(f"model {model_id!r} has unfinished requests; "
                                 f"it cannot leave the host cache")
        try:
            self.engine.cache.evict(model_id)
        except CacheMissError as exc:
            raise CatalogueError(f"model {model_id!r} is not in the host cache (tier: disk)") from exc
        except ModelInUseError as exc:
            raise CatalogueError(f"model {model_id!r} is resident in an arena slot: {exc}") from exc

    def preload(self, model_id: str) -> LoadTicket | None:
        """A ticket on its disk load (cancel it when no longer wanted); None when already cached."""
        self._known(model_id)
        return self.engine.model_tiers().fetch(model_id)

    def entry(self, model_id: str) -> CatalogueEntry:
        model = self._known(model_id)
        tiers = self.engine.model_tiers()
        resident = {m for m in (self.engine.active, self.engine.switcher.active_model) if m}
        load = next((p for p in tiers.progress() if p.model_id == model_id), None)
        return CatalogueEntry(model_id, model.profile.folder, tiers.tier(model_id, resident),
                              model.profile.nbytes, self.engine.num_requests(model_id),
                              load.loaded_bytes if load else None, bool(load and load.waiting_for_room))

    def entries(self) -> list[CatalogueEntry]:
        return [self.entry(m) for m in sorted(self.engine.models)]

    def _known(self, model_id: str):
        if model_id not in self.engine.models:
            raise CatalogueError(f"model {model_id!r} is not in the catalogue "
                                 f"({len(self.engine.models)} models there)")
        return self.engine.models[model_id]
