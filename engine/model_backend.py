"""ModelBackend: the narrow seam between the instances and whatever runs a model's forward pass.

Engines, the switcher and the schedulers only ever do four things with a model:

    backend = make_model_backend("native" | "vllm", spec)   # build for a shape, once
    backend.bind_weights({name: view of an arena slot})     # a switch: re-bind, no copy
    backend.bind_kv(PagedKVCache in backend.kv_layout)      # KV blocks the arena owns
    backend.execute(StepPlan) -> StepResult                 # one step, tokens sampled

Weight names and shapes are tokenpool's (model_switcher.model_specs: fused q|k|v and
gate|up), so the host cache and arena hold one layout whichever backend computes. Which
backend runs is a config value; nothing above this file branches on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .kv_cache import PagedKVCache
from .model_config import ModelConfig
from .scheduler import StepPlan, StepResult

ENGINES = ("native", "vllm")


@dataclass(frozen=True)
class BackendSpec:
    """What a backend is built for: one model shape on one device.

    folder: the model's checkpoint folder (vLLM reads its config.json to pick a model class).
    dtype: the dtype the model computes in (and weights are bound in, unless weight_dtype).
    max_positions: the longest context a step may reach (RoPE tables are sized to it).
    block_size: tokens per KV block. linear_kernel / attention: the native engine's choices
    (linear_kernel applies to load(); weights bound from a slot are applied as they are:
    F.linear, or bf16_linear.Bf16SlotLinear for bf16 matrices computed in float32).
    weight_dtype: the dtype matrices are bound in, where it differs from dtype (the native
    engine's bf16 slots on a CPU without bf16 instructions); None: dtype.
    """

    folder: Path
    config: ModelConfig
    dtype: torch.dtype
    max_positions: int
    device: str = "cpu"
    block_size: int = 16
    linear_kernel: str = "dense"
    attention: str = "auto"
    weight_dtype: torch.dtype | None = None


class ModelBackend(ABC):
    """One model shape's forward pass, KV access and sampling, behind the instances."""

    name: str

    @abstractmethod
    def bind_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Compute with these tensors from now on, without copying them.

        tensors: every name of model_specs(config, dtype) -> a tensor of that shape and dtype
        (views of an arena slot); they must outlive the binding."""

    @abstractmethod
    def load(self, folder: Path, round_to: torch.dtype | None) -> None:
        """Single-model engine: read the checkpoint into memory this backend owns (round_to:
        round weights to that dtype first), prepared as the backend computes fastest."""

    @abstractmethod
    def bind_kv(self, kv: PagedKVCache) -> None:
        """Read and write this cache from the next step on; kv.layout must be kv_layout."""

    @property
    @abstractmethod
    def kv_cache(self) -> PagedKVCache:
        """The cache bound last (swaps and hand-offs move its blocks)."""

    @abstractmethod
    def execute(self, plan: StepPlan, on_layer: Callable[[int], None] | None = None) -> StepResult:
        """Compute the plan's tokens and sample after each chunk that completes its sequence.

        on_layer(i): called once layer i has written the step's KV (KV streaming)."""

    @abstractmethod
    def describe(self) -> str:
        """What computes: backend, kernels (for logs and describe())."""


def make_model_backend(engine: str, spec: BackendSpec) -> ModelBackend:
    """Factory: 'native' (tokenpool's own model code and kernels) or 'vllm' (vLLM's model
    classes and attention kernels; needs the `tokenpool[vllm]` extra). Imports stay lazy:
    nothing of vLLM loads unless it is asked for."""
    check_engine(engine)
    if engine == "vllm":
        from .vllm_backend.backend import VllmBackend

        return VllmBackend(spec)
    from .native_backend import NativeBackend

    return NativeBackend(spec)


def slot_weight_dtype(engine: str, device: str, weights: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The dtype an instance holds a model's matrices in (host cache, arena slot): the compute
    dtype, except where the native engine computes bf16 weights in float32 on a CPU: it keeps them
    bf16 (half the bytes to cache, to copy on a switch and to read every step) and applies them
    with bf16_linear.Bf16SlotLinear."""
    from .bf16_linear import bf16_slot_supports

    check_engine(engine)
    if engine == "native" and bf16_slot_supports(torch.device(device), compute, weights):
        return weights
    return compute


def kv_layout_for(engine: str, device: str) -> str:
    """The PagedKVCache layout an engine's attention reads on a device (kv_cache.LAYOUTS)."""
    check_engine(engine)
    if engine == "vllm":
        from .vllm_backend.backend import VllmBackend

        return VllmBackend.layout_for(device)
    return "token_major"


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
