"""NativeBackend: tokenpool's own model code (CausalLM) and kernels behind ModelBackend.

It adds nothing to a step: execute() is the ModelRunner of the bound KV cache, made once
per cache, so the engines run exactly as they did before the backend seam existed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .attention import make_attention_backend
from .bf16_linear import Bf16SlotLinear
from .kv_cache import PagedKVCache
from .linear import DenseLinear, make_linear_kernel
from .model import CausalLM
from .model_backend import BackendSpec, ModelBackend
from .model_runner import ModelRunner
from .sampler import Sampler
from .scheduler import StepPlan, StepResult
from .weights import load_weights


class NativeBackend(ModelBackend):
    name = "native"

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        with torch.device("meta"):
            self.model = CausalLM(spec.config, spec.dtype, spec.max_positions)
        self.attention = make_attention_backend(spec.attention, spec.device)
        # Weights bound from a slot are applied as they lie: bf16 matrices computed in float32
        # by the bf16 kernel, anything else by F.linear.
        narrow = spec.weight_dtype not in (None, spec.dtype)
        self._slot_kernel = Bf16SlotLinear() if narrow else DenseLinear()
        self.linear_kernel = self._slot_kernel.name
        self._sampler = Sampler()
        self._runners: dict[int, ModelRunner] = {}  # id(PagedKVCache) -> its runner
        self._runner: ModelRunner | None = None

    def bind_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        model = self.model
        if model.rotary is None:  # once per module
            model.lm_head.weight = None  # tied heads use embed; untied ones are bound below
            model.prepare(DenseLinear(), self.spec.device)  # RoPE tables (the weights are meta)
        for name, view in tensors.items():
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, nn.Parameter(view, requires_grad=False))
        model.prepare_linears(self._slot_kernel)

    def load(self, folder: Path, round_to: torch.dtype | None) -> None:
        spec = self.spec
        kernel = make_linear_kernel(spec.linear_kernel, torch.device(spec.device), spec.dtype, round_to)
        self.model = self.model.to_empty(device=spec.device)
        with torch.no_grad():
            load_weights(self.model, folder, round_to)
            self.model.prepare(kernel)
        self.linear_kernel = kernel.name

    def bind_kv(self, kv: PagedKVCache) -> None:
        if kv.layout != "token_major":
            raise ValueError(f"the native engine reads token_major KV, got {kv.layout}")
        runner = self._runners.get(id(kv))
        if runner is None or runner.kv_cache is not kv:
            runner = self._runners[id(kv)] = ModelRunner(self.model, kv, self.attention)
            runner.sampler = self._sampler
        self._runner = runner

    @property
    def kv_cache(self) -> PagedKVCache:
        return self._runner.kv_cache

    @property
    def sampler(self) -> Sampler:
        return self._sampler

    @sampler.setter
    def sampler(self, sampler: Sampler) -> None:  # tests record logits through their own sampler
        self._sampler = sampler
        for runner in self._runners.values():
            runner.sampler = sampler

    def execute(self, plan: StepPlan, on_layer: Callable[[int], None] | None = None) -> StepResult:
        return self._runner.execute(plan, on_layer)

    def describe(self) -> str:
        return f"native (linear {self.linear_kernel}, attention {type(self.attention).__name__})"
