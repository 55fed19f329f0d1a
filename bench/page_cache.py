"""The kernel's page cache for a model's files: how much of them it holds, and dropping them.

Dropping uses posix_fadvise(DONTNEED) per file, after writing back its dirty pages: it needs
no privileges, but evicts only pages that no process has mapped (and some file systems ignore
it), so every drop is followed by a measurement with mincore(2), and reports say what was
really left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_PAGE = mmap.PAGESIZE


def model_files(folder: Path) -> list[Path]:
    """The files a model's cold load reads (its checkpoint shards)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix == ".safetensors")


def drop(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # DONTNEED keeps dirty pages (a model written moments ago)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(files: list[Path]) -> float:
    """Of the files' pages, the fraction now in the page cache (mincore on a fresh mapping,
    which reads nothing in)."""
    resident = total = 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            address = _mapping_address(mm)
            if _libc.mincore(address, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            resident += sum(v & 1 for v in vec)
            total += pages
    return resident / total if total else 0.0


def _mapping_address(mm: mmap.mmap) -> int:
    """The start address of a read-only mapping (ctypes cannot take a writable buffer of it)."""
    view = memoryview(mm)
    try:
        import numpy as np

        return np.frombuffer(view, dtype=np.uint8).ctypes.data
    finally:
        view.release()


def sequential_read_gbps(files: list[Path], chunk: int = 8 << 20) -> float:
    """GB/s of reading the files start to end into one reused buffer (what `dd bs=8M` does)."""
    buffer = bytearray(chunk)
    total, start = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / (time.perf_counter() - start) / 1e9
