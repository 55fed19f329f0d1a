"""Shared fixtures: tiny models written once per session, SmolLM2 imported once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_NAMES = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from tokenpool.engine.tiny_models import make_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    make_tiny_models(root)
    return root


@pytest.fixture(scope="session", params=TINY_NAMES)
def tiny_model(request, tiny_dir) -> Path:
    return tiny_dir / request.param


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct in HF layout (float32 so it doubles as a parity subject)."""
    from tokenpool.engine.gguf_import import import_gguf, smollm2_gguf_path

    cached = os.environ.get("TOKENPOOL_TEST_SMOLLM2")
    if cached and Path(cached, "config.json").is_file():
        return Path(cached)
    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    return import_gguf(smollm2_gguf_path(), out, dtype="float32", progress=False)
