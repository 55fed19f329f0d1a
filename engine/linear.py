"""Linear kernels: how a weight matrix is stored for the matrix library and applied.

Weights are prepared once when a model is loaded (packed into the layout the
library wants), so every step is one library call per projection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F


class LinearKernel(ABC):
    """prepare(weight [out, in]) once, then apply(x [..., in]) -> [..., out] every step."""

    name: str

    @abstractmethod
    def prepare(self, weight: torch.Tensor) -> Any:
        """-> what apply() takes: a tensor, or a kernel's own holder of several."""

    @abstractmethod
    def apply(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor: ...


class DenseLinear(LinearKernel):
    """Plain F.linear on the weight as stored; the reference and the CUDA path."""

    name = "dense"

    def prepare(self, weight):
        return weight

    def apply(self, x, prepared, bias):
        return F.linear(x, prepared, bias)


class OneDnnLinear(LinearKernel):
    """oneDNN-packed weights (CPU): 1.7-3x faster than F.linear at batch 8-32 here."""

    name = "onednn"
    _BATCH_HINT = 8  # the packing is valid for any batch; the hint picks the blocking

    def prepare(self, weight):
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), self._BATCH_HINT)

    def apply(self, x, prepared, bias):
        return torch.ops.mkldnn._linear_pointwise(x, prepared, bias, "none", [], "")


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether this CPU can pack and run oneDNN linears in dtype (bf16 needs AVX512/AVX-NE)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = OneDnnLinear().prepare(torch.zeros(8, 8, dtype=dtype))
        OneDnnLinear().apply(torch.zeros(2, 8, dtype=dtype), weight, None)
    except RuntimeError:
        return False
    return True


def make_linear_kernel(name: str, device: torch.device, dtype: torch.dtype,
                       weight_dtype: torch.dtype | None = None) -> LinearKernel:
    """Factory: 'dense', 'onednn', 'bf16_gemv' or 'auto'.

    dtype: what the model computes in; weight_dtype: what its weights were rounded to
    (default dtype). 'auto' picks bf16_gemv for bf16 weights computed in float32 on the CPU
    (see bf16_linear.py), else oneDNN on a CPU that supports dtype, else dense.
    """
    from .bf16_linear import Bf16GemvLinear, bf16_gemv_supports

    weight_dtype = weight_dtype or dtype
    if name == "auto":
        if bf16_gemv_supports(device, dtype, weight_dtype):
            name = "bf16_gemv"
        else:
            name = "onednn" if device.type == "cpu" and onednn_supports(dtype) else "dense"
    kernels = {"dense": DenseLinear, "onednn": OneDnnLinear, "bf16_gemv": Bf16GemvLinear}
    if name not in kernels:
        raise ValueError(f"unknown linear kernel {name!r}; choose from auto, {', '.join(kernels)}")
    if name == "onednn" and (device.type != "cpu" or not onednn_supports(dtype)):
        raise ValueError(f"linear kernel 'onednn' cannot run {dtype} on {device}")
    if name == "bf16_gemv" and not bf16_gemv_supports(device, dtype, weight_dtype):
        raise ValueError(f"linear kernel 'bf16_gemv' needs bfloat16 weights computed in float32 on a "
                         f"CPU with the C++ kernels; got {weight_dtype} weights in {dtype} on {device}")
    return kernels[name]()
