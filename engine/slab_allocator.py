"""SlabAllocator: bookkeeping of the host KV pool — fixed-size slabs, each holding blocks of one shape.

Pure arithmetic over byte offsets; it owns no memory (HostKVPool puts a buffer under it).

    pool:  | slab 0 (shape A) | slab 1 (shape B) | slab 2 (free) | slab 3 (shape A) | ...
    slab:  | block 0 | block 1 | ... | block k-1 | tail |     k = slab_bytes // shape.nbytes
    offset of block j of slab s = s * slab_bytes + j * shape.nbytes

A slab takes a shape when it is opened and forgets it when its last block is freed, so models of
different shapes share the pool and the waste stays bounded by the partly used slabs of each shape.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .model_config import ModelConfig

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
SLAB_ALIGN = 64  # slabs start on cache lines; block offsets inside are multiples of the element size


class KVPoolFullError(MemoryError):
    """The host KV pool has too few free blocks of a shape for a request; nothing was allocated."""


@dataclass(frozen=True)
class BlockShape:
    """One KV block of one model shape, all layers: [num_layers, 2, block_size, num_kv_heads, head_dim]."""

    num_layers: int
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    dtype: str  # float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"BlockShape dtype must be one of {sorted(ITEMSIZE)}, got {self.dtype!r}")
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BlockShape {name} must be positive, got {getattr(self, name)}")

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n * self.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def of(cls, config: ModelConfig, block_size: int, dtype: torch.dtype) -> BlockShape:
        name = str(dtype).removeprefix("torch.")
        return cls(config.num_layers, block_size, config.num_kv_heads, config.head_dim, name)


@dataclass(frozen=True)
class SlabStats:
    """A snapshot of the pool's occupancy."""

    total_slabs: int
    free_slabs: int
    slabs_by_shape: dict[BlockShape, int]  # slabs holding at least one block, per shape
    used_bytes: int  # bytes of live blocks
    utilization: float  # used_bytes / (total_slabs * slab_bytes)
    fragmentation: float  # unused bytes inside slabs holding >= 1 block, over the bytes of those slabs


@dataclass
class _Slab:
    """A slab opened for one shape: which of its `capacity` blocks are live, which are free."""

    shape: BlockShape
    capacity: int
    free: list[int] = field(default_factory=list)  # a stack; popping hands out low blocks first
    live: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.free = list(range(self.capacity - 1, -1, -1))


class SlabAllocator:
    """Hands out byte offsets of KV blocks in slabs of one shape each.

    Not thread-safe: the owner (HostKVPool) serialises calls.
    """

    def __init__(self, total_bytes: int, slab_bytes: int) -> None:
        if not isinstance(slab_bytes, int) or slab_bytes <= 0 or slab_bytes % SLAB_ALIGN:
            raise ValueError(f"slab_bytes must be a positive multiple of {SLAB_ALIGN}, got {slab_bytes!r}")
        if not isinstance(total_bytes, int) or total_bytes < slab_bytes:
            raise ValueError(f"total_bytes must be an int >= slab_bytes={slab_bytes}, got {total_bytes!r}")
        self.slab_bytes = slab_bytes
        self.num_slabs = total_bytes // slab_bytes  # a tail shorter than a slab is never used
        self._free_slabs = list(range(self.num_slabs - 1, -1, -1))  # a stack: low slabs first
        self._slabs: dict[int, _Slab] = {}  # open slabs by index
        self._partial: dict[BlockShape, set[int]] = {}  # open slabs with a free block, per shape
        self._used_bytes = 0

    @property
    def capacity_bytes(self) -> int:
        return self.num_slabs * self.slab_bytes

    def blocks_per_slab(self, shape: BlockShape) -> int:
        if shape.nbytes > self.slab_bytes:
            raise ValueError(f"a block of {shape} takes {shape.nbytes} bytes, more than a slab "
                             f"(slab_bytes={self.slab_bytes}); use larger slabs")
        return self.slab_bytes // shape.nbytes

    def free_blocks(self, shape: BlockShape) -> int:
        """How many blocks of `shape` an alloc could hand out now."""
        partial = sum(len(self._slabs[s].free) for s in self._partial.get(shape, ()))
        return partial + len(self._free_slabs) * self.blocks_per_slab(shape)

    def alloc(self, shape: BlockShape, n: int) -> list[int]:
        """Byte offsets of n blocks of `shape`, all or nothing.

        Fills the fullest partly used slabs of the shape first (so the emptier ones can drain and
        go back to the free list), then opens empty slabs. Raises KVPoolFullError, changing
        nothing, when fewer than n blocks are free.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks, got n={n}")
        free = self.free_blocks(shape)
        if n > free:
            raise KVPoolFullError(f"host KV pool full: need {n} blocks of {shape.nbytes} bytes, "
                                  f"{free} free ({len(self._free_slabs)} empty slabs of {self.num_slabs})")
        offsets: list[int] = []
        for index in sorted(self._partial.get(shape, ()), key=lambda s: len(self._slabs[s].free)):
            offsets += self._take(index, n - len(offsets))
        while len(offsets) < n:
            offsets += self._take(self._open(shape), n - len(offsets))
        return offsets

    def free(self, offsets: Iterable[int]) -> None:
        """Return blocks; a slab left without live blocks goes back to the free-slab list.

        Validates every offset first (unknown, misaligned, already free, repeated -> ValueError)
        so a bad call changes nothing.
        """
        located = [self._locate(offset) for offset in offsets]
        if len(set(located)) != len(located):
            raise ValueError("free() got the same block offset twice")
        for index, block in located:
            self._give_back(index, block)

    def shape_at(self, offset: int) -> BlockShape:
        """The shape of the live block at `offset`; ValueError if no live block starts there."""
        index, _ = self._locate(offset)
        return self._slabs[index].shape

    def stats(self) -> SlabStats:
        by_shape: dict[BlockShape, int] = {}
        for slab in self._slabs.values():
            by_shape[slab.shape] = by_shape.get(slab.shape, 0) + 1
        open_bytes = len(self._slabs) * self.slab_bytes
        return SlabStats(
            total_slabs=self.num_slabs,
            free_slabs=len(self._free_slabs),
            slabs_by_shape=by_shape,
            used_bytes=self._used_bytes,
            utilization=self._used_bytes / self.capacity_bytes,
            fragmentation=(open_bytes - self._used_bytes) / open_bytes if open_bytes else 0.0,
        )

    def _open(self, shape: BlockShape) -> int:
        index = self._free_slabs.pop()
        self._slabs[index] = _Slab(shape, self.blocks_per_slab(shape))
        self._partial.setdefault(shape, set()).add(index)
        return index

    def _take(self, index: int, n: int) -> list[int]:
        """Up to n blocks from open slab `index`, as byte offsets."""
        slab = self._slabs[index]
        blocks = [slab.free.pop() for _ in range(min(n, len(slab.free)))]
        slab.live.update(blocks)
        if not slab.free:
            self._partial[slab.shape].discard(index)
        self._used_bytes += len(blocks) * slab.shape.nbytes
        base = index * self.slab_bytes
        return [base + b * slab.shape.nbytes for b in blocks]

    def _give_back(self, index: int, block: int) -> None:
        slab = self._slabs[index]
        slab.live.remove(block)
        slab.free.append(block)
        self._used_bytes -= slab.shape.nbytes
        if slab.live:
            self._partial.setdefault(slab.shape, set()).add(index)
            return
        del self._slabs[index]  # empty: the slab forgets its shape and can take any other
        self._partial[slab.shape].discard(index)
        if not self._partial[slab.shape]:
            del self._partial[slab.shape]
        self._free_slabs.append(index)

    def _locate(self, offset: int) -> tuple[int, int]:
        """(slab index, block index) of the live block starting at `offset`, else ValueError."""
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"a block offset is a non-negative int, got {offset!r}")
        index, within = divmod(offset, self.slab_bytes)
        slab = self._slabs.get(index)
        if slab is None:
            raise ValueError(f"offset {offset!r} is not in an allocated slab of the host KV pool")
        block, rest = divmod(within, slab.shape.nbytes)
        if rest or block not in slab.live:
            raise ValueError(f"offset {offset} is not a live block (slab {index} holds blocks of "
                             f"{slab.shape.nbytes} bytes; double free or a stale offset?)")
        return index, block
