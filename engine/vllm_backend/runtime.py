"""Process-wide vLLM set-up: the pinned version, a VllmConfig per model shape, and the
one-process "distributed" world vLLM's parallel layers ask for their rank in."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import vllm
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import parallel_state
from vllm.engine.arg_utils import EngineArgs

from . import INSTALL_HINT, PINNED_VERSION


def check_version() -> None:
    """RuntimeError unless the installed vLLM is the pinned one (its internals are used)."""
    if vllm.__version__ != PINNED_VERSION:
        raise RuntimeError(f"tokenpool's vLLM backend is written against vllm {PINNED_VERSION}, "
                           f"found {vllm.__version__}; install the pinned one: {INSTALL_HINT}")


def vllm_config(folder: Path, dtype: torch.dtype, block_size: int, max_len: int) -> VllmConfig:
    """A VllmConfig for one model folder, eager (no torch.compile, no CUDA graphs).

    Built through EngineArgs, as vLLM's own entry points build it, so the platform's
    defaults apply; only configuration objects are made here, no engine."""
    args = EngineArgs(model=str(folder), dtype=str(dtype).removeprefix("torch."), enforce_eager=True,
                      block_size=block_size, max_model_len=max_len, skip_tokenizer_init=True,
                      seed=0)
    return args.create_engine_config()


def ensure_world_of_one(config: VllmConfig) -> None:
    """vLLM's parallel linears ask for their tensor-parallel rank: a gloo world of one
    process answers them (once per process)."""
    if parallel_state.model_parallel_is_initialized():
        return
    with set_current_vllm_config(config):
        if not torch.distributed.is_initialized():
            parallel_state.init_distributed_environment(
                world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                local_rank=0, backend="gloo")
        parallel_state.ensure_model_parallel_initialized(1, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
