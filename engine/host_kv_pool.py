"""HostKVPool: the node's host memory for swapped-out KV — one shared buffer carved by a SlabAllocator.

The buffer is a file in /dev/shm (mode 0600 in a per-user folder), so other processes on the node
can map the same bytes; it is unlinked on close. Where /dev/shm is missing or full, an anonymous
mapping stands in and the pool works the same within one process.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
import threading
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch

from .private_shm import private_dir
from .slab_allocator import BlockShape, SlabAllocator, SlabStats

log = logging.getLogger(__name__)

DEFAULT_SHM_DIR = Path("/dev/shm")
POOL_PREFIX = "kv-pool-"  # pool files: kv-pool-<pid>-<random>, each flock-ed by its owner
# Large enough that the biggest common block (a 70B model in bf16 is 5 MiB per 16 tokens) wastes
# little at a slab's tail; small enough that a model with few sequences holds few slabs.
DEFAULT_SLAB_BYTES = 64 << 20


class HostKVPool:
    """Blocks of KV in one host buffer; offsets come from the SlabAllocator, views from block_views.

    Thread-safe: alloc, free and block_views take a lock, so swap workers may call them.
    """

    def __init__(self, total_bytes: int, slab_bytes: int = DEFAULT_SLAB_BYTES,
                 shm_dir: Path | None = None, pin: bool = False) -> None:
        """total_bytes is rounded down to whole slabs. shm_dir defaults to /dev/shm; pin page-locks
        the buffer for CUDA DMA (needs a CUDA build of torch)."""
        self.allocator = SlabAllocator(total_bytes, slab_bytes)
        self._lock = threading.Lock()
        self.path, self._mmap, lock_fd = _map_buffer(self.allocator.capacity_bytes,
                                                     shm_dir or DEFAULT_SHM_DIR)
        self._bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)  # [capacity_bytes]
        # A pool dropped without close() still removes its file; after a crash (no finalizer runs)
        # its lock is gone with the process, and the next pool created on the node removes it.
        self._unlink = weakref.finalize(self, _unlink, self.path, lock_fd)
        self.pinned = False
        if pin:
            _cuda_host_register(self._bytes)
            self.pinned = True

    @property
    def nbytes(self) -> int:
        return self.allocator.capacity_bytes

    @property
    def buffer(self) -> torch.Tensor:
        """The whole pool as one uint8 tensor [nbytes], e.g. to register with a NIXL agent."""
        if self._bytes is None:
            raise RuntimeError("HostKVPool is closed")
        return self._bytes

    def alloc(self, shape: BlockShape, n: int) -> list[int]:
        """Offsets of n blocks of `shape`; KVPoolFullError and no change when they do not fit."""
        with self._lock:
            return self.allocator.alloc(shape, n)

    def free(self, offsets: Iterable[int]) -> None:
        with self._lock:
            self.allocator.free(offsets)

    def free_blocks(self, shape: BlockShape) -> int:
        """Blocks of shape an alloc could hand out now."""
        with self._lock:
            return self.allocator.free_blocks(shape)

    def stats(self) -> SlabStats:
        with self._lock:
            return self.allocator.stats()

    def block_view(self, offset: int, shape: BlockShape) -> torch.Tensor:
        """The live block at `offset` as [num_layers, 2, block_size, num_kv_heads, head_dim]."""
        return self.block_views([offset], shape)[0]

    def block_views(self, offsets: Iterable[int], shape: BlockShape) -> list[torch.Tensor]:
        """Views of the live blocks at `offsets`, each [num_layers, 2, block_size, num_kv_heads, head_dim].

        ValueError unless the allocator handed out every offset for a block of exactly `shape`, so
        a stale or foreign offset cannot alias another sequence's KV. Views are cut from one typed
        view per slab: 10x cheaper than slicing bytes per block, which showed in swaps of 512 blocks.
        """
        if self._bytes is None:
            raise RuntimeError("HostKVPool is closed")
        slabs: dict[int, torch.Tensor] = {}
        views = []
        with self._lock:
            for offset in offsets:
                held = self.allocator.shape_at(offset)
                if held != shape:
                    raise ValueError(f"block at offset {offset} holds {held}, not {shape}")
                index, within = divmod(offset, self.allocator.slab_bytes)
                if index not in slabs:
                    slabs[index] = self._slab_blocks(index, shape)
                views.append(slabs[index][within // shape.nbytes])
        return views

    def _slab_blocks(self, index: int, shape: BlockShape) -> torch.Tensor:
        """Slab `index` as [blocks_per_slab, num_layers, 2, block_size, num_kv_heads, head_dim]."""
        count = self.allocator.blocks_per_slab(shape)
        start = index * self.allocator.slab_bytes
        raw = self._bytes[start:start + count * shape.nbytes]
        return raw.view(shape.torch_dtype).view(count, *shape.dims)

    def close(self) -> None:
        """Unlink the shm file and drop the pool's mapping.

        The pages go when the last view does: torch.frombuffer keeps the mmap object alive but does
        not hold its buffer export, so unmapping here (mmap.close) would leave live views dangling.
        """
        if self._bytes is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self._bytes.data_ptr())
        self._bytes = self._mmap = None
        self._unlink()

    def __enter__(self) -> HostKVPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _map_buffer(size: int, shm_dir: Path) -> tuple[Path | None, mmap.mmap, int | None]:
    """(path, mapping, lock fd) of a new 0600 file of `size` bytes under shm_dir, else (None,
    anonymous, None)."""
    try:
        return _map_shm_file(size, shm_dir)
    except OSError as exc:
        warnings.warn(f"host KV pool: {shm_dir} unusable ({exc}); using an anonymous buffer", stacklevel=3)
        return None, mmap.mmap(-1, size), None


def _map_shm_file(size: int, shm_dir: Path) -> tuple[Path, mmap.mmap, int]:
    """The file is made under a temporary name, locked (flock EX, held by the returned fd for the
    pool's life), then renamed into place: a sweeper never sees a pool file nobody holds but a
    dead owner's."""
    if not shm_dir.is_dir():  # never create the shared-memory mount itself: fall back instead
        raise FileNotFoundError(f"no folder {shm_dir}")
    folder = private_dir(shm_dir / f"tokenpool-{os.getuid()}")
    sweep_orphaned_pools(folder)
    name = f"{POOL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging, path = folder / f".{name}.new", folder / name
    fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Reserve the pages now: a sparse tmpfs file that later runs out of room kills the
        # process with SIGBUS on first touch instead of failing here.
        os.posix_fallocate(fd, 0, size)
        mapping = mmap.mmap(fd, size)
        os.rename(staging, path)
        return path, mapping, fd
    except BaseException:
        staging.unlink(missing_ok=True)
        os.close(fd)
        raise


def sweep_orphaned_pools(folder: Path) -> list[Path]:
    """Remove the pool files under folder whose owner died without closing them (kill -9: no
    finalizer ran); an owner's lock dies with it. -> the files removed."""
    removed = []
    for path in folder.glob(f"{POOL_PREFIX}*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or not a regular file we may open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner lives
        else:
            path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d host KV pool files of processes that died holding them", len(removed))
    return removed


def _unlink(path: Path | None, lock_fd: int | None = None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
    if lock_fd is not None:
        os.close(lock_fd)


def _cuda_host_register(data: torch.Tensor) -> None:
    """Page-lock the buffer so host<->device copies are DMA that can overlap compute."""
    err = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), data.numel(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of the host KV pool ({data.numel()} bytes) failed: {err}")
