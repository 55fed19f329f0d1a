"""Which dtype the engine computes in, given the weights' dtype and what the CPU does well.

A bfloat16 (or float16) model computes in its own dtype where the processor has native
instructions for it (AVX512-BF16 or AMX on x86, where oneDNN's bf16 matmuls run at full
rate), and in float32 from the dtype-rounded weights where it has not: oneDNN and torch
then emulate the narrow dtype with conversions, slower than float32 itself. On CUDA the
weights' dtype is always native. `EngineConfig.compute_dtype` forces either path.

Measured on an AMD EPYC with avx512_bf16 (SmolLM2-135M, 2 threads, `bench engine --against
tokenpool-float32`): native bf16 is 1.2-1.7x the float32 fallback in prefill and decode at
batch 1, 8 and 32 (the README's table).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

CHOICES = ("auto", "native", "float32")

# /proc/cpuinfo flags that mean the CPU multiplies these dtypes natively.
_NATIVE_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes dtype natively (float32 always) and oneDNN can use it."""
    if dtype == torch.float32:
        return True
    if not any(flag in cpu_flags() for flag in _NATIVE_FLAGS.get(dtype, ())):
        return False
    from .linear import onednn_supports

    return onednn_supports(dtype)


def resolve_compute_dtype(weight_dtype: torch.dtype, choice: str, device: str) -> torch.dtype:
    """-> the dtype the model computes in.

    choice: 'auto' (native where this device has it, else float32), 'native' (the weights'
    dtype, emulated if need be: slow but the same numerics), 'float32' (float32 math on the
    dtype-rounded weights).
    """
    if choice not in CHOICES:
        raise ValueError(f"compute_dtype must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "float32":
        return torch.float32
    if choice == "native" or torch.device(device).type != "cpu":
        return weight_dtype
    return weight_dtype if cpu_has_native(weight_dtype) else torch.float32
