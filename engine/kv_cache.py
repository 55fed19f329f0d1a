"""PagedKVCache: the device tensor holding every sequence's keys and values in blocks."""

from __future__ import annotations

import torch

from .model_config import ModelConfig


class PagedKVCache:
    """KV for all layers in fixed-size blocks.

    kv: [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]
    One block of one sequence across all layers is kv[:, :, b] — the unit that
    swaps and transfers move. layer(i) gives the per-layer (k, v) views the
    attention backend writes and reads.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 storage: torch.Tensor | None = None) -> None:
        """storage: bytes (uint8, 1-D) to lay the cache over, e.g. an arena's KV region;
        None allocates zeroed memory."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        if storage is None:
            self.kv = torch.zeros(shape, dtype=dtype, device=device)
        else:
            nbytes = num_blocks * self.bytes_per_block(config, block_size, dtype)
            self.kv = storage[:nbytes].view(dtype).view(shape)
        self._layers = [(self.kv[i, 0], self.kv[i, 1]) for i in range(config.num_layers)]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self._layers[index]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return config.num_layers * 2 * block_size * config.num_kv_heads * config.head_dim * elem
