"""Bf16GemvLinear: bfloat16 weights computed in float32 on a CPU without bf16 instructions.

Decode there is memory-bound, and a float32 copy of the weights doubles the bytes each step
reads. This kernel keeps a bf16 copy for the few-row matmuls of decode (csrc/bf16_linear.cpp
widens each weight in registers: exact, so the result is float32 math on the rounded weights
up to summation order) and a oneDNN-packed float32 copy for prefill, where oneDNN's blocking
wins. Measured on an AVX2 AMD EPYC (2 threads, a loaded machine, SmolLM2-135M's projections
with 30 layers' worth of weights, so that they stream from memory as in a decode step): 2.8x
oneDNN per layer at 1 row, 1.5-2.2x at 2-8 rows, 0.5-1.0x at 16-32 (second pass over the
weight), hence MAX_GEMV_ROWS; whole-engine decode 1.3-1.55x at batch 1 and 8, batch 32 alike.

Bf16SlotLinear is the same kernel for a switching instance, whose weights are views into an arena
slot (bytes copied from the host cache: nothing packed, nothing kept beside them). It reads the
bf16 view for up to MAX_SLOT_ROWS rows, and widens a float32 copy of the weight for the call
beyond (prefill, where the matmul outweighs the copy). Measured on the AVX2 EPYC (2 threads,
SmolLM2's projections x 30 layers, ms, best of 5): the kernel 13-16 / 21 / 33-42 / 63-80 at 1 /
8 / 16 / 32 rows, F.linear on float32 weights 28-31 / 51-68 / 61-78 / 83-110, widen + F.linear
23-29 / 53-107 / 59-130 / 90-155; at 128 rows 271-330 / 223-274 / 206-353.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_extension
from .linear import LinearKernel, OneDnnLinear

# Rows up to which the bf16 kernel runs: it reads the weight once per 8 rows (csrc), so
# beyond 8 it reads it again and oneDNN's float32 blocking catches up.
MAX_GEMV_ROWS = 8
# Rows up to which Bf16SlotLinear reads the bf16 view: at 32 the kernel still matches F.linear
# on a float32 copy, and widening a copy costs more than the matmul does at these sizes.
MAX_SLOT_ROWS = 32


@dataclass(frozen=True)
class Bf16Weights:
    """A projection's two copies: bf16 [out, in] for decode, oneDNN-packed float32 otherwise."""

    bf16: torch.Tensor
    packed: torch.Tensor


class Bf16GemvLinear(LinearKernel):
    """prepare(weight: float32 holding bf16-rounded values) -> Bf16Weights; apply picks by rows."""

    name = "bf16_gemv"

    def __init__(self) -> None:
        self._onednn = OneDnnLinear()
        self._kernels = _cpu_kernels(self.name)

    def prepare(self, weight):
        bf16 = weight.to(torch.bfloat16).contiguous()
        if not torch.equal(bf16.float(), weight.float()):
            raise ValueError("bf16_gemv needs weights rounded to bfloat16; these are not")
        return Bf16Weights(bf16, self._onednn.prepare(weight.float()))

    def apply(self, x, prepared, bias):
        if _rows(x) > MAX_GEMV_ROWS or x.dtype != torch.float32:
            return self._onednn.apply(x, prepared.packed, bias)
        return _bf16_kernel(self._kernels, x, prepared.bf16, bias)


class Bf16SlotLinear(LinearKernel):
    """prepare(weight: a contiguous bf16 view) -> the view itself; apply in float32 by rows."""

    name = "bf16_slot"

    def __init__(self) -> None:
        self._kernels = _cpu_kernels(self.name)

    def prepare(self, weight):
        if weight.dtype != torch.bfloat16 or not weight.is_contiguous():
            raise ValueError(f"bf16_slot applies contiguous bfloat16 weights as they lie, got "
                             f"{weight.dtype} with strides {weight.stride()}")
        return weight

    def apply(self, x, prepared, bias):
        if _rows(x) > MAX_SLOT_ROWS:
            return F.linear(x, prepared.to(x.dtype), bias)
        return _bf16_kernel(self._kernels, x, prepared, bias)


def _cpu_kernels(kernel: str):
    """The C++ CPU kernels' module; RuntimeError naming why for `kernel` when they cannot load."""
    kernels = cpu_extension.module()
    if kernels is None:
        raise RuntimeError(f"{kernel} needs the C++ CPU kernels: {cpu_extension.unavailable_reason()}")
    return kernels


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _bf16_kernel(kernels, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] float32 @ weight [out, in] bf16 (+ bias float32) -> [..., out] float32."""
    flat = x.reshape(_rows(x), x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = kernels.bf16_linear(flat, weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def bf16_slot_supports(device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether bf16_slot applies: bf16 weights computed in float32 on a CPU with the kernels."""
    return (device.type == "cpu" and dtype == torch.float32 and weight_dtype == torch.bfloat16
            and cpu_extension.available())


def bf16_gemv_supports(device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether bf16_gemv applies: bf16_slot's conditions, and oneDNN for its float32 copy."""
    from .linear import onednn_supports

    return bf16_slot_supports(device, dtype, weight_dtype) and onednn_supports(torch.float32)
