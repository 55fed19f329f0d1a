"""Fused paged decode attention for the CPU: a small C++ extension built on first use,
and the attention backend that runs decode tokens through it.

The kernel (csrc/paged_attention.cpp) lives in the project's one CPU extension, built by
cpu_extension on first use: without a compiler or ninja, available() says False (and why,
once) and the engine keeps torch's SDPA.
"""

from __future__ import annotations

import math

import torch

from . import cpu_extension
from .attention import AttentionMetadata, TorchSDPABackend
from .cpu_extension import available, unavailable_reason

__all__ = ["CpuPagedBackend", "available", "decode_extent", "make_cpu_paged_backend",
           "paged_decode_attention", "unavailable_reason"]


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window: int | None = None) -> torch.Tensor:
    """One query token per sequence attends over its cached keys, read in place.

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D] (any strides but a
    contiguous last dim), H % KVH == 0, D % 8 == 0; all on the CPU, one dtype.
    block_tables: [B, max_blocks] int64; seq_lens: [B] int64, 1 <= seq_len <= max_blocks *
    block_size, counting the query's own token (at position seq_len - 1).
    window (>= 1): attend only keys at positions > seq_len - 1 - window; None: all.
    -> [B, H, D] contiguous, in q's dtype; float32 math (bf16/fp16 widened per element).
    Bad shapes, block ids or lengths raise RuntimeError.
    """
    module = cpu_extension.module()
    if module is None:
        raise RuntimeError(f"fused paged attention unavailable: {unavailable_reason()}")
    return module.paged_decode_attention(
        q, k_cache, v_cache, block_tables, seq_lens, float(scale), window)


def decode_extent(meta: AttentionMetadata) -> tuple[torch.Tensor, int | None]:
    """-> (seq_lens [num_decodes] int64, window) of a step's decode tokens.

    Read from the metadata when the runner provides them, else recovered from decode_mask
    ([n, 1, 1, L] bool, True on [seq_len - window, seq_len) clipped at 0). Any window that
    reproduces every row's first key works, since rows not clipped are shorter than it.
    """
    seq_lens = getattr(meta, "decode_seq_lens", None)  # fields proposed in attention.py
    if seq_lens is not None:
        return seq_lens, getattr(meta, "sliding_window", None)
    mask = meta.decode_mask.flatten(1)
    positions = torch.arange(1, mask.shape[1] + 1)
    seq_lens = torch.where(mask, positions, 0).amax(1)
    first = mask.int().argmax(1)
    window = int((seq_lens - first).max()) if bool((first > 0).any()) else None
    return seq_lens, window


class CpuPagedBackend(TorchSDPABackend):
    """TorchSDPABackend whose decode tokens run the fused kernel; prefill stays on SDPA."""

    def __init__(self) -> None:
        self._extent: tuple[AttentionMetadata, tuple[torch.Tensor, int | None]] | None = None

    def _decode(self, q, k_cache, v_cache, meta):
        """q: [n, H, D] -> [n, H, 1, D], as TorchSDPABackend._decode returns."""
        if q.device.type != "cpu" or q.shape[-1] % 8:  # the kernel's limits: SDPA does the rest
            return super()._decode(q, k_cache, v_cache, meta)
        seq_lens, window = self._decode_extent(meta)
        out = paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, seq_lens,
                                     1.0 / math.sqrt(q.shape[-1]), window)
        return out.unsqueeze(2)

    def _decode_extent(self, meta: AttentionMetadata) -> tuple[torch.Tensor, int | None]:
        """decode_extent(meta) once per step, not once per layer: every layer gets the same meta."""
        if self._extent is None or self._extent[0] is not meta:
            self._extent = (meta, decode_extent(meta))
        return self._extent[1]


def make_cpu_paged_backend() -> TorchSDPABackend:
    """The fused backend when the extension builds here, else plain SDPA (reason logged)."""
    return CpuPagedBackend() if available() else TorchSDPABackend()
