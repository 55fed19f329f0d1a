"""ModelConfig: the parts of a Hugging Face config.json the Llama-family runtime needs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFolderError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (the only rope_scaling type supported)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one Llama-family model, read from config.json."""

    architecture: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama when attention_bias is set
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelFolderError(f"model folder {folder} has no config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFolderError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelFolderError(f"{path} must hold a JSON object")
        generation = _read_optional_json(Path(folder) / "generation_config.json")
        return cls.from_dict(raw, generation, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, generation: dict | None = None, source: str = "config") -> ModelConfig:
        arch = _architecture(raw, source)
        try:
            hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            head_dim = raw.get("head_dim") or hidden // heads
            config = cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_field(raw).get("rope_theta", 10000.0)),
                rope_scaling=_rope_scaling(raw, source),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
                qk_norm=arch == "qwen3",
                sliding_window=_sliding_window(raw, arch),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_eos_ids(raw, generation or {}),
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            )
        except KeyError as exc:
            raise ModelFolderError(f"{source} lacks required field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ModelFolderError(f"{source} has a malformed field: {exc}") from exc
        config._validate(source)
        return config

    def _validate(self, source: str) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelFolderError(f"{source}: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelFolderError(
                f"{source}: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelFolderError(f"{source}: head_dim={self.head_dim} must be even for RoPE")


def _read_optional_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else None


def _architecture(raw: dict, source: str) -> str:
    archs = raw.get("architectures") or []
    for name in archs:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    found = ", ".join(map(str, archs)) or f"model_type={raw.get('model_type')!r}"
    raise UnsupportedModelError(
        f"{source}: unsupported architecture {found}; supported: "
        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")


def _rope_field(raw: dict) -> dict:
    """transformers 5 writes rope_parameters; older configs rope_theta + rope_scaling."""
    merged = dict(raw.get("rope_scaling") or {})
    merged.update(raw.get("rope_parameters") or {})
    if "rope_theta" in raw:
        merged["rope_theta"] = raw["rope_theta"]
    return merged


def _rope_scaling(raw: dict, source: str) -> RopeScaling | None:
    scaling = _rope_field(raw)
    if not scaling.get("rope_type") and not scaling.get("type"):
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("default", None):
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"{source}: rope_scaling type {kind!r} is not supported "
                                    "(supported: llama3)")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _sliding_window(raw: dict, arch: str) -> int | None:
    window = raw.get("sliding_window")
    if arch in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        return None
    if window is None or int(window) >= int(raw.get("max_position_embeddings", math.inf)):
        return None
    return int(window)


def _eos_ids(raw: dict, generation: dict) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (generation.get("eos_token_id"), raw.get("eos_token_id")):
        for item in value if isinstance(value, list) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return tuple(ids)
