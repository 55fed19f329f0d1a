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
import re
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
    """This CPU's model and feature flags: -march=native code built on one CPU may not run
    on another that shares the extension folder (NFS home, container image)."""
    text = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text += "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return text


def _build_source() -> Path:
    """The kernel source, copied into its build folder under torch's extension root.

    The folder's name digests the source, this CPU, the flags and torch's version, so each
    combination is built once and then only loaded. Compiling the copy, not the installed
    file, keeps torch's build file identical for every install location, so two checkouts
    sharing TORCH_EXTENSIONS_DIR do not keep rebuilding each other's kernel.
    """
    from torch.utils import cpp_extension

    code = _SOURCE.read_bytes()
    key = "\0".join([_cpu_signature(), " ".join(_CFLAGS), torch.__version__]).encode() + code
    name = f"tokenpool_paged_attention_{hashlib.sha256(key).hexdigest()[:12]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / _SOURCE.name
    if not source.is_file() or source.read_bytes() != code:
        partial = folder / f".{source.name}.{os.getpid()}"  # another process may be compiling it
        partial.write_bytes(code)
        os.replace(partial, source)
    return source


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
        error = _one_line(exc)
        _log(f"fused paged attention unavailable, using SDPA: {error}")
        return _Build(None, error)


def _one_line(exc: Exception) -> str:
    """The gist of a failed build: torch's first line, plus the compiler's first error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
    errors = [line for line in lines[1:] if re.search(r"error|not found", line, re.IGNORECASE)
              and not line.startswith(("[", "FAILED"))]
    head = lines[0].split(": [")[0]  # torch puts the whole compile command after it
    return f"{type(exc).__name__}: {head}" + (f": {errors[0]}" if errors else "")


def _compile_or_load() -> ModuleType:
    """torch builds the extension if its folder holds no up-to-date build, then loads it."""
    from torch.utils import cpp_extension

    source = _build_source()
    name = source.parent.name
    first = not (source.parent / f"{name}.so").exists()
    if first:
        _log(f"compiling the paged attention kernel into {source.parent} (once per machine) ...")
    start = time.perf_counter()
    module = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=_CFLAGS,
                                extra_ldflags=["-fopenmp"], build_directory=str(source.parent))
    if first:
        _log(f"paged attention kernel built in {time.perf_counter() - start:.1f} s")
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

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D] (any strides but a
    contiguous last dim), H % KVH == 0, D % 8 == 0; all on the CPU, one dtype.
    block_tables: [B, max_blocks] int64; seq_lens: [B] int64, 1 <= seq_len <= max_blocks *
    block_size, counting the query's own token (at position seq_len - 1).
    window (>= 1): attend only keys at positions > seq_len - 1 - window; None: all.
    -> [B, H, D] contiguous, in q's dtype; float32 math (bf16/fp16 widened per element).
    Bad shapes, block ids or lengths raise RuntimeError.
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
