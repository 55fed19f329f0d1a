"""BlockManager: hands out fixed-size KV blocks and keeps each sequence's block table."""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    """Free-list allocator over block ids [0, num_blocks).

    A sequence holding n tokens of KV owns ceil(n / block_size) blocks; slot
    (block_table[p // block_size], p % block_size) holds token position p.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that seq can hold num_tokens positions of KV."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give seq enough blocks for num_tokens positions; raises if there are too few."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            raise MemoryError(f"{seq.request_id} needs {need} KV blocks, {len(self._free)} free")
        seq.block_table.extend(self._free.popleft() for _ in range(need))

    def release(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
