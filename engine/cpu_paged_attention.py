"""Fused paged decode attention for the CPU: a small C++ extension built on first use,
and the attention backend that runs decode tokens through it.

The extension is compiled from csrc/paged_attention.cpp with -march=native into torch's
extension folder (TORCH_EXTENSIONS_DIR, else torch's default), so later processes on the
same machine load it in well under a second. Without a compiler or ninja, available()
says False (and why, once) and the engine keeps torch's SDPA.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .attention import AttentionMetadata, TorchSDPABackend

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for runs inline here


def _log(message: str) -> None:
    print(f"tokenpool: {message}", file=sys.stderr, flush=True)


def _cpu_signature() -> str:
    """Short digest of this CPU's model and feature flags: -march=native code built on one
    CPU may not run on another that shares the extension folder (NFS home, container image)."""
    text = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text += "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _build_dir(name: str) -> Path:
    """Where torch builds and caches the extension: $TORCH_EXTENSIONS_DIR/name, as torch does."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class _Build:
    """The loaded extension, or why there is none."""

    module: ModuleType | None
    error: str = ""


@functools.cache
def _load() -> _Build:
    """Compile (first use on this machine) or load the extension, once per process."""
    try:
        return _Build(_compile_or_load())
    except Exception as exc:  # no compiler, no ninja, a failed build: all mean "use SDPA"
        lines = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
        _log(f"fused paged attention unavailable, using SDPA: {error}")
        return _Build(None, error)


def _compile_or_load() -> ModuleType:
    from torch.utils import cpp_extension

    name = f"tokenpool_paged_attention_{_cpu_signature()}"
    build_dir = _build_dir(name)
    built = build_dir / f"{name}.so"
    stale = not built.exists() or built.stat().st_mtime < _SOURCE.stat().st_mtime
    if stale:
        _log(f"compiling the paged attention kernel into {build_dir} (first use only) ...")
    start = time.perf_counter()
    module = cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_CFLAGS,
                                extra_ldflags=["-fopenmp"], build_directory=str(build_dir))
    elapsed = time.perf_counter() - start
    if stale or elapsed > 2.0:
        _log(f"paged attention kernel built in {elapsed:.1f} s")
    return module


def available() -> bool:
    """True when the extension builds and loads here; otherwise the reason is logged once."""
    return _load().module is not None


def unavailable_reason() -> str:
    """Why available() is False ('' when it is True)."""
    return _load().error


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window: int | None = None) -> torch.Tensor:
    """One query token per sequence attends over its cached keys, read in place.

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D] with H % KVH == 0;
    block_tables: [B, max_blocks] int64; seq_lens: [B] int64, 1 <= seq_len <= max_blocks *
    block_size, counting the query's own token (at position seq_len - 1).
    window: attend only keys at positions > seq_len - 1 - window; None: all.
    -> [B, H, D] in q's dtype; float32 math (bf16/fp16 converted per element).
    """
    module = _load().module
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

    def _decode(self, q, k_cache, v_cache, meta):
        """q: [n, H, D] -> [n, H, 1, D], as TorchSDPABackend._decode returns."""
        seq_lens, window = decode_extent(meta)
        out = paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, seq_lens,
                                     1.0 / math.sqrt(q.shape[-1]), window)
        return out.unsqueeze(2)


def make_cpu_paged_backend() -> TorchSDPABackend:
    """The fused backend when the extension builds here, else plain SDPA (reason logged)."""
    return CpuPagedBackend() if available() else TorchSDPABackend()
