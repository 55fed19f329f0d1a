"""DeviceArena: the one device allocation an instance makes, carved by bump allocators.

    0                 kv_bytes          kv_bytes + slot      end
    | KV blocks        | model slot A     | model slot B     |
                         (active)           (prefetch)

The two model slots trade roles on every switch: the next model is copied into the
slot not in use while the current one computes. Freeing is a pointer reset, so
nothing on the switch path asks torch's allocator for memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class ArenaFullError(MemoryError):
    """A request does not fit the arena region it was made in."""


@dataclass
class BumpRegion:
    """Bytes [start, end) of the arena, handed out in order; reset() frees all at once."""

    name: str
    start: int
    end: int
    top: int = -1
    alignment: int = 256  # what CUDA copies and vector loads like

    def __post_init__(self) -> None:
        self.top = self.start

    @property
    def capacity(self) -> int:
        return self.end - self.start

    @property
    def used(self) -> int:
        return self.top - self.start

    def alloc(self, nbytes: int) -> int:
        """Offset of nbytes fresh bytes in the arena; raises ArenaFullError when they do not fit."""
        offset = -(-self.top // self.alignment) * self.alignment
        if offset + nbytes > self.end:
            raise ArenaFullError(f"arena region {self.name!r} has {self.end - offset} bytes left, "
                                 f"{nbytes} asked")
        self.top = offset + nbytes
        return offset

    def mark(self) -> int:
        return self.top

    def reset(self, mark: int | None = None) -> None:
        self.top = self.start if mark is None else mark


class DeviceArena:
    def __init__(self, kv_bytes: int, slot_bytes: int, device: torch.device | str = "cpu") -> None:
        if kv_bytes < 1 or slot_bytes < 1:
            raise ValueError(f"arena regions must be positive, got kv {kv_bytes}, slot {slot_bytes}")
        self.device = torch.device(device)
        self.buffer = torch.empty(kv_bytes + 2 * slot_bytes, dtype=torch.uint8, device=self.device)
        self.kv = BumpRegion("kv", 0, kv_bytes)
        self.slots = (BumpRegion("slot A", kv_bytes, kv_bytes + slot_bytes),
                      BumpRegion("slot B", kv_bytes + slot_bytes, kv_bytes + 2 * slot_bytes))

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor over arena bytes [offset, offset + numel * itemsize)."""
        nbytes = _nbytes(dtype, shape)
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"view [{offset}, {offset + nbytes}) lies outside the arena "
                             f"of {self.nbytes} bytes")
        return self.buffer[offset:offset + nbytes].view(dtype).view(shape)

    def alloc_tensor(self, region: BumpRegion, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.view(region.alloc(_nbytes(dtype, shape)), dtype, shape)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize
