"""The model-backend seam without vLLM: config and flag validation, the native backend behind the
factory, and the KV layouts' logical view (what swaps and hand-offs move)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from tokenpool.engine.kv_cache import PagedKVCache
from tokenpool.engine.llm_engine import EngineConfig
from tokenpool.engine.model_backend import kv_layout_for, make_model_backend
from tokenpool.engine.model_config import ModelConfig


def test_engine_choice_is_validated_with_the_bad_value_quoted():
    with pytest.raises(ValueError, match="'tensorrt'"):
        EngineConfig(engine="tensorrt")
    with pytest.raises(ValueError, match="'onnx'"):
        make_model_backend("onnx", None)
    assert kv_layout_for("native", "cpu") == "token_major"


def test_instances_up_and_serve_take_engine_flags(tiny_dir):
    from tokenpool.cli import up_command
    from tokenpool.cli.instance_setup import add_engine_args
    from tokenpool.compose.launcher import StackConfig

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert p.parse_args([]).engine == "native" and p.parse_args(["--engine", "vllm"]).engine == "vllm"
    root = argparse.ArgumentParser()
    up_command.add_parser(root.add_subparsers())
    args = root.parse_args(["up", "--model", f"m={tiny_dir / 'tiny-llama'}", "--engine", "vllm"])
    assert up_command.stack_config(args).engine == "vllm"
    with pytest.raises(ValueError, match="'x'"):
        StackConfig(models={"m": tiny_dir / "tiny-llama"}, engine="x")


def test_native_engine_does_not_import_vllm(tiny_dir):
    """In a fresh process: this one may have imported vLLM for its own tests."""
    code = ("import sys; from tokenpool.engine.llm_engine import EngineConfig, LLMEngine; "
            "from tokenpool.engine.sampling_params import SamplingParams; "
            f"e = LLMEngine({str(tiny_dir / 'tiny-qwen2')!r}, EngineConfig(kv_cache_bytes=1 << 20)); "
            "e.generate(['Hi'], SamplingParams(max_tokens=2)); assert 'native' in e.describe(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("layout", ["token_major", "head_major"])
def test_every_kv_layout_shows_one_logical_shape_whose_blocks_are_disjoint(tiny_dir, layout):
    config = ModelConfig.from_folder(tiny_dir / "tiny-qwen3")
    storage = torch.zeros(8 * PagedKVCache.bytes_per_block(config, 16, torch.float32), dtype=torch.uint8)
    kv = PagedKVCache(config, 8, 16, torch.float32, storage=storage, layout=layout)
    assert kv.kv.shape == (config.num_layers, 2, 8, 16, config.num_kv_heads, config.head_dim)
    assert kv.physical.data_ptr() == storage.data_ptr() and kv.physical.is_contiguous()
    for b in range(8):  # block b's logical view fills block b's bytes and nothing else
        kv.kv.select(2, b).fill_(b + 1)
    assert sorted(kv.physical.unique().tolist()) == list(range(1, 9))
    for b in range(8):
        assert (kv.kv.select(2, b) == b + 1).all()
    with pytest.raises(ValueError, match="'planar'"):
        PagedKVCache(config, 8, 16, torch.float32, layout="planar")
