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


@pytest.fixture
def shm_path() -> Path:
    """A fresh folder in shared memory, where the host model cache and KV pool live when
    deployed (on CUDA only tmpfs pages can be page-locked for DMA); removed afterwards."""
    import tempfile

    from tokenpool.engine.private_shm import private_dir, shm_root

    with tempfile.TemporaryDirectory(dir=private_dir(shm_root())) as folder:
        yield Path(folder)


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


def cut_layers(source: Path, dest: Path, num_layers: int) -> Path:
    """A copy of a tiny model keeping its first num_layers layers: another shape, same tokenizer."""
    import json
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    (dest / "config.json").write_text(json.dumps(config))
    tensors = load_file(dest / "model.safetensors")
    kept = {k: np.ascontiguousarray(v) for k, v in tensors.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    save_file(kept, dest / "model.safetensors")
    return dest


@pytest.fixture(scope="session")
def six_models(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """The four tiny models and two-layer cuts of tiny-llama and tiny-mistral: six shapes."""
    root = tmp_path_factory.mktemp("six")
    models = {name: tiny_dir / name for name in TINY_NAMES}
    for name in ("tiny-llama", "tiny-mistral"):
        models[f"{name}-2l"] = cut_layers(tiny_dir / name, root / f"{name}-2l", 2)
    return models


def _bad_requests():
    """(GenerateRequest fields, status, a phrase the message must hold): every front door refuses these."""
    import grpc
    from tokenpool.protos.v1 import inference_pb2 as pb

    return [
        ({"model": "nope", "text": "hi"}, grpc.StatusCode.NOT_FOUND, "'nope'"),
        ({"model": "tiny-llama", "text": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        ({"model": "tiny-llama", "text": "hi", "sampling": pb.SamplingParams(max_tokens=0)},
         grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"model": "tiny-llama", "text": "hi", "sampling": pb.SamplingParams(max_tokens=10**6)},
         grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"model": "tiny-llama", "text": "hi", "sampling": pb.SamplingParams(temperature=-1)},
         grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"model": "tiny-llama", "text": "hi", "sampling": pb.SamplingParams(top_p=1.5)},
         grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"model": "tiny-llama", "token_ids": pb.TokenIds(ids=[5] * 5000)}, grpc.StatusCode.OUT_OF_RANGE,
         "context"),
        ({"model": "tiny-llama", "token_ids": pb.TokenIds(ids=[10**6])}, grpc.StatusCode.INVALID_ARGUMENT,
         "vocabulary"),
        ({"model": "tiny-llama", "text": "x" * (5 << 20)}, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ]


BAD_REQUESTS = _bad_requests()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    """An admin token file (0600) for a module's stack: --admin-token-file."""
    path = tmp_path_factory.mktemp("admin") / "admin-token"
    path.write_text("stack-admin-secret\n")
    path.chmod(0o600)
    return path
