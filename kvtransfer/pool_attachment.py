"""PoolAttachment: another process's mapping of the node's host KV pool file.

The agent owns the pool (a HostKVPool) and hands out byte offsets; instances map the same file
MAP_SHARED and read or write blocks there. Offsets come from peers over the network, so every one
is bounds-checked before a view is cut: no offset reaches memory outside the file.

    file:  | ... | block at offset o: shape.nbytes bytes | ... |      0 <= o, o + shape.nbytes <= nbytes
    view:  [num_layers, 2, block_size, num_kv_heads, head_dim] of shape.torch_dtype, o % itemsize == 0
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenpool.engine.private_shm import shm_root
from tokenpool.engine.slab_allocator import BlockShape


class PoolAttachment:
    """A read-write MAP_SHARED mapping of an existing pool file of exactly `nbytes` bytes.

    PermissionError unless the file is a regular file (not a symlink) directly in shm_root(),
    owned by this uid, with no group or other permission bits; ValueError if its size is not
    nbytes. Thread-safe.
    """

    def __init__(self, path: Path, nbytes: int) -> None:
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"pool nbytes must be a positive int, got {nbytes!r}")
        self.path = Path(path)
        self.nbytes = nbytes
        _check_folder(self.path)
        fd = _open_nofollow(self.path)
        try:
            _check_file(self.path, os.fstat(fd), nbytes)
            self._mmap: mmap.mmap | None = mmap.mmap(fd, nbytes, mmap.MAP_SHARED,
                                                      mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps its own reference to the file
        self._bytes: torch.Tensor | None = torch.frombuffer(self._mmap, dtype=torch.uint8)  # [nbytes]
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # the whole file, one flat view per dtype
        self._lock = threading.Lock()

    def views(self, offsets: Iterable[int], shape: BlockShape) -> list[torch.Tensor]:
        """Views of the blocks at `offsets`, each [num_layers, 2, block_size, num_kv_heads, head_dim].

        They share memory with the file (writes reach every process mapping it) and stay valid
        while they live, even past close(). ValueError naming the offset and the bound for an
        offset that is not an int, negative, misaligned for the dtype or running past the file;
        then no view is returned.
        """
        offsets = list(offsets)
        for offset in offsets:
            self._check_offset(offset, shape)
        flat = self._flat(shape.torch_dtype)
        count = shape.nbytes // shape.itemsize
        return [flat[o // shape.itemsize:o // shape.itemsize + count].view(shape.dims) for o in offsets]

    def close(self) -> None:
        """Drop this attachment's mapping; the file stays (the agent unlinks it).

        The pages go when the last view does: torch.frombuffer keeps the mmap object alive but does
        not hold its buffer export, so unmapping here (mmap.close) would leave live views dangling.
        """
        with self._lock:
            self._bytes = self._mmap = None
            self._typed.clear()

    def __enter__(self) -> PoolAttachment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_offset(self, offset: int, shape: BlockShape) -> None:
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise ValueError(f"block offset {offset!r} is not an int")
        if offset < 0:
            raise ValueError(f"block offset {offset} is negative")
        if offset % shape.itemsize:
            raise ValueError(f"block offset {offset} is not a multiple of the {shape.dtype} item size "
                             f"({shape.itemsize} bytes)")
        if offset + shape.nbytes > self.nbytes:
            raise ValueError(f"block offset {offset} + block size {shape.nbytes} runs past the pool's "
                             f"{self.nbytes} bytes ({self.path})")

    def _flat(self, dtype: torch.dtype) -> torch.Tensor:
        """The file as one flat tensor of dtype: slicing it per block is cheaper than a view(dtype) each."""
        with self._lock:
            if self._bytes is None:
                raise RuntimeError(f"PoolAttachment of {self.path} is closed")
            if dtype not in self._typed:
                itemsize = torch.empty((), dtype=dtype).element_size()
                self._typed[dtype] = self._bytes[:self.nbytes - self.nbytes % itemsize].view(dtype)
            return self._typed[dtype]


def _check_folder(path: Path) -> None:
    """PermissionError unless path's folder is shm_root(): a file elsewhere was not made by an agent."""
    root = shm_root()
    if path.parent.resolve() != root.resolve():
        raise PermissionError(f"pool file {path} is not in {root}; refusing to map it")


def _open_nofollow(path: Path) -> int:
    """fd of path opened read-write; PermissionError for a symlink (O_NOFOLLOW fails with ELOOP).

    O_NONBLOCK so a FIFO planted under the name cannot hang the open; _check_file refuses it next.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionError(f"pool file {path} is a symlink; refusing to follow it") from None
        raise


def _check_file(path: Path, st: os.stat_result, nbytes: int) -> None:
    """Checks on the opened file itself (fstat), so a rename after the open cannot slip past them."""
    if not stat.S_ISREG(st.st_mode):
        raise PermissionError(f"pool file {path} is not a regular file ({stat.filemode(st.st_mode)})")
    if st.st_uid != os.getuid():
        raise PermissionError(f"pool file {path} is owned by uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o077:
        raise PermissionError(f"pool file {path} has mode {stat.filemode(st.st_mode)}; "
                              f"it must grant nothing to group or others (0600)")
    if st.st_size != nbytes:
        raise ValueError(f"pool file {path} has {st.st_size} bytes, not the {nbytes} the agent described")
