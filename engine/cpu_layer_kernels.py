"""Fused CPU kernels for the elementwise parts of a decoder layer (csrc/layer_kernels.cpp):
RMSNorm, residual add + RMSNorm, RoPE on q and k, SiLU-gated multiply.

Each function runs one C++ call where torch runs several small ops, and falls back to
exactly the torch code it replaces when the project's CPU extension cannot be built here
(see cpu_extension) or the tensors are not float32/bf16 CPU tensors of one dtype. Both
paths compute in float32; in bf16 the kernels round where torch does, so the two agree
to within one bf16 ulp.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from . import cpu_extension
from .cpu_extension import available, unavailable_reason

__all__ = ["add_rms_norm", "available", "rms_norm", "rotary", "silu_mul", "unavailable_reason"]

_DTYPES = (torch.float32, torch.bfloat16)


def _kernels(x: torch.Tensor) -> ModuleType | None:
    """The extension if x is a float32/bf16 CPU tensor (and it builds here), else None."""
    return cpu_extension.module() if x.is_cpu and x.dtype in _DTYPES else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H], weight: [H] -> x * rsqrt(mean(x^2, -1) + eps) * weight: [..., H], a new
    contiguous tensor. As F.rms_norm: float32 math, one rounding to x's dtype."""
    kernels = _kernels(x)
    if kernels is None or weight.dtype != x.dtype:
        return F.rms_norm(x, weight.shape, weight, eps)
    if x.dim() == 2 and x.stride(1) == 1:  # a step's hidden states: skip the reshapes
        return kernels.rms_norm(x, weight.contiguous(), eps)
    return kernels.rms_norm(_rows(x), weight.contiguous(), eps).view(x.shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x: [..., H] -> [N, H] with a contiguous last dim: a view where one exists."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The pre-norm residual step: residual += x in place (rounded to residual's dtype, as
    torch's add), then -> rms_norm(residual, weight, eps) in x's dtype, a new tensor.

    x, residual: [..., H]; residual in x's dtype or float32 (the model keeps its residual
    stream in float32: see CausalLM), weight in x's dtype.
    """
    kernels = _kernels(x)
    if (kernels is None or weight.dtype != x.dtype or residual.dtype not in (x.dtype, torch.float32)
            or x.shape != residual.shape or not residual.is_contiguous()):
        summed = residual.add_(x)
        return F.rms_norm(summed, weight.shape, weight.to(summed.dtype), eps).to(x.dtype)
    if x.dim() == 2 and x.stride(1) == 1:
        return kernels.add_rms_norm(x, residual, weight.contiguous(), eps)
    out = kernels.add_rms_norm(_rows(x), residual.view(-1, x.shape[-1]), weight.contiguous(), eps)
    return out.view(x.shape)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE: x * cos + rotate_half(x) * sin for x in q [T, heads, D] and k [T, kv_heads, D];
    cos, sin: [T, 1, D] (or [T, D]) in q's dtype. -> (q, k) rotated.

    The kernel rotates q and k in place (any strides but the last: views of a fused qkv
    projection are fine); the fallback returns new tensors. Use the returned pair, and do
    not rely on q and k keeping their old values.
    """
    kernels = _kernels(q)
    if kernels is None or not _rotary_fits(q, k, cos, sin):
        return _rotate(q, cos, sin), _rotate(k, cos, sin)
    kernels.rotary(q, k, cos, sin)
    return q, k


def _rotary_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel takes these as they are: q and k it writes in place, and cos, sin
    must hold one [D] row per token, not a broadcast."""
    return (q.dim() == 3 and k.dim() == 3 and q.stride(-1) == 1 and k.stride(-1) == 1
            and k.dtype == cos.dtype == sin.dtype == q.dtype and cos.shape == sin.shape
            and cos.numel() == q.shape[0] * q.shape[-1] and cos.is_contiguous() and sin.is_contiguous())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The torch reference of rotary() for one of q, k."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [..., 2I] (gate | up) -> silu(gate) * up: [..., I], a new contiguous tensor.
    In bf16, silu(gate) rounds to bf16 before the multiply, as torch's two ops do."""
    kernels = _kernels(gate_up)
    if kernels is None:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    if gate_up.dim() == 2 and gate_up.stride(1) == 1:
        return kernels.silu_mul(gate_up)
    return kernels.silu_mul(_rows(gate_up)).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
