"""ModelStore: the local folder of models, each in Hugging Face layout.

The store lives in $TOKENPOOL_MODELS, else ~/.cache/tokenpool/models. Wherever a
command takes --model it accepts a folder path or the name of a model in the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFolderError
from .model_config import ModelConfig

ENV_VAR = "TOKENPOOL_MODELS"
DEFAULT_MODEL = "smollm2-135m-instruct"


def default_store_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenpool" / "models"


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path
    architecture: str
    num_bytes: int


class ModelStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_store_dir()

    def path_for(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ModelFolderError(f"invalid model name {name!r}: use a plain folder name")
        return self.root / name

    def resolve(self, model: str | Path) -> Path:
        """A folder path, or a store name -> a model folder that has a config.json."""
        candidate = Path(model).expanduser()
        if not candidate.is_dir() and isinstance(model, str) and "/" not in model:
            candidate = self.root / model
        if not candidate.is_dir():
            known = ", ".join(m.name for m in self.list()) or "none"
            raise ModelFolderError(f"model {str(model)!r} is neither a folder nor a model in the "
                                   f"store {self.root} (models there: {known})")
        if not (candidate / "config.json").is_file():
            raise ModelFolderError(f"model folder {candidate} has no config.json")
        return candidate

    def list(self) -> list[StoredModel]:
        if not self.root.is_dir():
            return []
        models = []
        for folder in sorted(self.root.iterdir()):
            if not (folder / "config.json").is_file():
                continue
            try:
                arch = ModelConfig.from_folder(folder).architecture
            except ValueError as exc:
                arch = f"invalid ({exc})"
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            models.append(StoredModel(folder.name, folder, arch, size))
        return models
