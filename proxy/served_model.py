"""ServedModel: what the front door knows of a model — limits and tokenizer, no weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenpool.engine.model_config import ModelConfig
from tokenpool.engine.tokenizer import Tokenizer

DEFAULT_MAX_CONTEXT = 1 << 15  # MultiModelEngine's position limit when no max_model_len is set


@dataclass(frozen=True)
class ServedModel:
    """What the front door needs to know of a model: limits and its tokenizer, no weights."""

    id: str
    architecture: str
    max_context: int
    weight_bytes: int
    tokenizer: Tokenizer


def served_models(engine) -> dict[str, ServedModel]:
    """The engine's models as the proxy describes them."""
    served = {}
    for model_id, model in engine.models.items():
        profile = model.profile
        served[model_id] = ServedModel(model_id, profile.config.architecture, model.book.max_model_len,
                                       profile.nbytes, profile.tokenizer)
    return served


def served_model_from_folder(model_id: str, folder: Path, dtype: str = "auto") -> ServedModel:
    """The same description without loading weights (the proxy of a disaggregated stack)."""
    from tokenpool.engine.llm_engine import EngineConfig
    from tokenpool.engine.multi_model_engine import instance_specs

    config = ModelConfig.from_folder(folder)
    nbytes = sum(spec.nbytes for spec in instance_specs(EngineConfig(dtype=dtype), config))
    return ServedModel(model_id, config.architecture,
                       min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT), nbytes,
                       Tokenizer.from_folder(folder))
