"""ModelTiers: where each of an instance's catalogue models is, and moving it up a tier.

    disk (a folder in the store) --ColdLoader--> host cache (/dev/shm) --switch--> arena slot

An instance registers catalogue models lazily: only the config and tokenizer are read,
and the checkpoint's header is checked. The weights reach the host cache on demand: when
the model is switched to, or earlier when a scheduler knows it is next (fetch). Host-cache
room is made by the schedulers' order (cache_eviction.ModelActivity): never a model with
unfinished work on this instance, nor one expected next. Models registered eagerly
(read at start-up) are tracked too, so one evicted later is read again from its folder.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch

from .cache_eviction import ModelActivity
from .cold_loader import ROOM_WAIT_S, ColdLoader, LoadProgress, LoadTicket
from .host_model_cache import CachedModel, CacheMissError, HostModelCache
from .model_switcher import ModelProfile, cache_metadata, checkpoint_filler

MAX_PINS = 2  # the model being switched to and the one being prefetched
RELOAD_TRIES = 3  # another process may evict a model between its load and our attach

Fill = Callable[[str, torch.Tensor], None]
OpenFill = Callable[[], Fill]  # maps the checkpoint and checks it again


class Tier(enum.Enum):
    DISK = "disk"
    HOST = "host"
    RESIDENT = "resident"


class ModelTiers:
    def __init__(self, cache: HostModelCache, has_work: Callable[[str], bool],
                 reload_bytes_per_s: float = 1 << 30, room_wait_s: float = ROOM_WAIT_S) -> None:
        self.cache = cache
        self.activity = ModelActivity(reload_bytes_per_s, has_work=has_work)
        cache.victim_order = self.activity.victim_order
        self.activity.on_settled = self._unpin  # resident: the switcher's own lease holds it now
        self.loader = ColdLoader(cache, room_wait_s=room_wait_s)
        self._fills: dict[str, OpenFill] = {}  # how to open each model's fill from disk
        self._profiles: dict[str, ModelProfile] = {}
        self._pins: dict[str, CachedModel] = {}  # oldest first; engine thread only

    @staticmethod
    def check(profile: ModelProfile, round_to: torch.dtype | None) -> OpenFill:
        """How to open the model's fill from disk; a bad checkpoint raises here (nothing is
        tracked yet). The checkpoint is mapped only while a load runs: a mapping held from
        registration on would pin every catalogue model's pages in the page cache."""
        checkpoint_filler(profile, round_to)
        return lambda: checkpoint_filler(profile, round_to)

    def add(self, profile: ModelProfile, open_fill: OpenFill) -> None:
        """Track a registered model, its weights read through `open_fill()` when needed."""
        self._fills[profile.model_id] = open_fill
        self._profiles[profile.model_id] = profile

    def remove(self, model_id: str) -> None:
        self._unpin(model_id)
        self._fills.pop(model_id, None)
        self._profiles.pop(model_id, None)
        self.activity.forget(model_id)

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._fills

    def tier(self, model_id: str, resident: set[str]) -> Tier:
        if model_id in resident:
            return Tier.RESIDENT
        return Tier.HOST if self.cache.contains(model_id) else Tier.DISK

    def fetch(self, model_id: str) -> LoadTicket | None:
        """Start reading model_id into the host cache; None when it is there already."""
        if self.cache.contains(model_id):
            return None
        profile = self._profiles[model_id]
        return self.loader.load(model_id, profile.specs, _FillOnFirstUse(self._fills[model_id]),
                                cache_metadata(profile))

    def ensure_cached(self, model_id: str) -> None:
        """Block until model_id is in the host cache, pinned there (the read runs on the loader's
        thread)."""
        self.activity.expect(model_id)  # keep it from being chosen as a victim meanwhile
        for _ in range(RELOAD_TRIES):
            ticket = self.fetch(model_id)
            if ticket is not None:
                try:
                    ticket.wait()
                finally:
                    ticket.cancel()  # the load is done; this only drops the claim
            if self.pin(model_id):
                return
        raise CacheMissError(f"model {model_id!r} was evicted from the host cache by other processes "
                             f"{RELOAD_TRIES} times between its load and its use; enlarge the host cache")

    def pin(self, model_id: str) -> bool:
        """Hold a lease on model_id if it is in the host cache (True), so no process evicts it
        between this check and the switcher's own attach (another process's eviction policy does
        not know what this one is about to use). Let go once it is settled (switched to), or as
        the oldest of MAX_PINS."""
        if model_id in self._pins:
            self._pins[model_id] = self._pins.pop(model_id)  # the newest now
            return True
        try:
            self._pins[model_id] = self.cache.attach(model_id)
        except CacheMissError:
            return False
        while len(self._pins) > MAX_PINS:
            self._unpin(next(iter(self._pins)))
        return True

    def _unpin(self, model_id: str) -> None:
        lease = self._pins.pop(model_id, None)
        if lease is not None:
            lease.close()

    def progress(self) -> list[LoadProgress]:
        return self.loader.progress()

    def close(self) -> None:
        self.loader.close()
        for model_id in list(self._pins):
            self._unpin(model_id)


class _FillOnFirstUse:
    """One load's fill: the checkpoint is opened at the first tensor, on the loader's thread
    (never the engine's), and unmapped when the load lets go of this object."""

    def __init__(self, open_fill: OpenFill) -> None:
        self._open = open_fill
        self._fill: Fill | None = None

    def __call__(self, name: str, dest: torch.Tensor) -> None:
        if self._fill is None:
            self._fill = self._open()
        self._fill(name, dest)
