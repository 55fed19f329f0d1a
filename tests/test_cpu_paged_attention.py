"""The fused CPU paged decode kernel against the engine's reference: K/V gathered from
the cache block-wise, then masked SDPA (TorchSDPABackend._decode)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tokenpool.engine.attention import AttentionMetadata, PrefillSpan, TorchSDPABackend, attend_mask
from tokenpool.engine.cpu_paged_attention import (
    CpuPagedBackend,
    available,
    decode_extent,
    paged_decode_attention,
    unavailable_reason,
)

pytestmark = pytest.mark.skipif(not available(), reason=f"extension unavailable: {unavailable_reason()}")

BLOCK = 16


def make_cache(num_blocks: int, kv_heads: int, dim: int, gen: torch.Generator, dtype=torch.float32):
    """k, v: [num_blocks, BLOCK, kv_heads, dim] random."""
    shape = (num_blocks, BLOCK, kv_heads, dim)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


def make_tables(seq_lens: torch.Tensor, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """[B, max_blocks] int64: each sequence's blocks drawn from one shuffled pool (so no two
    sequences share a block and neighbours in a table are far apart), 0-padded as the runner does."""
    needs = [(int(n) + BLOCK - 1) // BLOCK for n in seq_lens]
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    assert sum(needs) <= num_blocks
    tables = torch.zeros(len(needs), max(needs), dtype=torch.long)
    for i, need in enumerate(needs):
        tables[i, :need] = torch.tensor(pool[:need])
        pool = pool[need:]
    return tables


def decode_meta(tables: torch.Tensor, seq_lens: torch.Tensor, window: int | None) -> AttentionMetadata:
    """Decode-only metadata as ModelRunner._metadata builds it."""
    n, width = tables.shape
    mask = attend_mask((seq_lens - 1).view(-1, 1), width * BLOCK, window).view(n, 1, 1, -1)
    return AttentionMetadata(torch.zeros(n, dtype=torch.long), n, tables, mask, ())


def reference(q, k, v, tables, seq_lens, window=None) -> torch.Tensor:
    """[B, H, D] from gather + masked SDPA."""
    return TorchSDPABackend()._decode(q, k, v, decode_meta(tables, seq_lens, window)).squeeze(2)


def random_case(batch: int, kv_heads: int, group: int, dim: int, seed: int, max_len: int = 90):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, max_len + 1, (batch,), generator=gen)
    seq_lens[0] = max_len if max_len % BLOCK else max_len - 1  # never a whole number of blocks
    num_blocks = sum((int(n) + BLOCK - 1) // BLOCK for n in seq_lens) + 5
    k, v = make_cache(num_blocks, kv_heads, dim, gen)
    q = torch.randn(batch, kv_heads * group, dim, generator=gen)
    return q, k, v, make_tables(seq_lens, num_blocks, gen), seq_lens


@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dim", [16, 24, 32, 64, 128])  # 24: the loops not specialised for a size
def test_matches_gather_sdpa(batch, group, dim):
    q, k, v, tables, seq_lens = random_case(batch, 2, group, dim, seed=batch * 100 + group * 10 + dim)
    out = paged_decode_attention(q, k, v, tables, seq_lens, 1 / math.sqrt(dim))
    torch.testing.assert_close(out, reference(q, k, v, tables, seq_lens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 7, 16, 33, 1000])
def test_sliding_window(window):
    q, k, v, tables, seq_lens = random_case(5, 3, 3, 32, seed=window, max_len=70)
    seq_lens[1] = 3  # shorter than most windows: nothing to clip
    out = paged_decode_attention(q, k, v, tables, seq_lens, 1 / math.sqrt(32), window)
    torch.testing.assert_close(out, reference(q, k, v, tables, seq_lens, window), atol=1e-5, rtol=1e-5)


def test_strided_query_and_cache_views():
    """q a slice of a wider tensor; k and v interleaved in one tensor, so neither is contiguous."""
    gen = torch.Generator().manual_seed(7)
    kv = torch.randn(12, BLOCK, 2, 2, 32, generator=gen)  # [blocks, slot, k/v, kv_heads, dim]
    k, v = kv[:, :, 0], kv[:, :, 1]
    q = torch.randn(4, 8, 48, generator=gen)[..., :32]
    seq_lens = torch.tensor([1, 17, 40, 9])
    tables = make_tables(seq_lens, 12, gen)
    out = paged_decode_attention(q, k, v, tables, seq_lens, 32 ** -0.5)
    assert not k.is_contiguous() and not q.is_contiguous() and out.is_contiguous()
    torch.testing.assert_close(out, reference(q, k, v, tables, seq_lens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    q, k, v, tables, seq_lens = random_case(3, 3, 3, 64, seed=11)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = paged_decode_attention(q, k, v, tables, seq_lens, 1 / 8)
    assert out.dtype == dtype
    expected = reference(q.float(), k.float(), v.float(), tables, seq_lens)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_rejects_bad_inputs():
    q, k, v, tables, seq_lens = random_case(2, 3, 3, 16, seed=3, max_len=20)
    with pytest.raises(RuntimeError, match="seq_len"):
        paged_decode_attention(q, k, v, tables, torch.tensor([0, 5]), 0.25)
    with pytest.raises(RuntimeError, match="block id"):
        paged_decode_attention(q, k, v, tables + 1000, seq_lens, 0.25)
    with pytest.raises(RuntimeError, match="H % KVH"):
        paged_decode_attention(q[:, :4], k, v, tables, seq_lens, 0.25)
    with pytest.raises(RuntimeError, match="window"):
        paged_decode_attention(q, k, v, tables, seq_lens, 0.25, 0)


@pytest.mark.parametrize("window", [None, 5, 40])
def test_decode_extent_from_mask(window):
    seq_lens = torch.tensor([1, 5, 6, 37, 64])
    tables = torch.zeros(5, 4, dtype=torch.long)
    got_lens, got_window = decode_extent(decode_meta(tables, seq_lens, window))
    assert got_lens.tolist() == seq_lens.tolist()
    # Any window that clips every row as the real one does is equivalent.
    clipped = [max(0, int(n) - window) for n in seq_lens] if window else [0] * 5
    assert [max(0, int(n) - (got_window or 10**9)) for n in seq_lens] == clipped


def test_decode_extent_prefers_metadata_fields():
    """With decode_seq_lens and sliding_window on the metadata, the mask is not consulted."""
    seq_lens = torch.tensor([3, 40])
    meta = SimpleNamespace(decode_seq_lens=seq_lens, sliding_window=7, decode_mask=None)
    got_lens, got_window = decode_extent(meta)
    assert got_lens is seq_lens and got_window == 7


def test_backend_matches_sdpa_on_a_mixed_step():
    """Decodes through the kernel, a prefill after them through SDPA: same output as SDPA."""
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, dim = 6, 2, 32
    k_cache, v_cache = make_cache(20, kv_heads, dim, gen)
    seq_lens = torch.tensor([9, 33, 16])  # after writing this step's token
    tables = make_tables(torch.tensor([9, 33, 16, 10]), 20, gen)
    slots = [int(tables[i, (n - 1) // BLOCK]) * BLOCK + (n - 1) % BLOCK for i, n in enumerate(seq_lens)]
    slots += [int(tables[3, p // BLOCK]) * BLOCK + p % BLOCK for p in range(10)]
    decode = decode_meta(tables[:3, :3], seq_lens, None)
    span = PrefillSpan(3, 13, 0, tables[3, :1], None)
    meta = AttentionMetadata(torch.tensor(slots), 3, decode.decode_block_tables, decode.decode_mask, (span,))
    q = torch.randn(13, heads, dim, generator=gen)
    k, v = torch.randn(13, kv_heads, dim, generator=gen), torch.randn(13, kv_heads, dim, generator=gen)
    expected = TorchSDPABackend().forward(q, k, v, (k_cache.clone(), v_cache.clone()), meta)
    got = CpuPagedBackend().forward(q, k, v, (k_cache, v_cache), meta)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_backend_falls_back_to_sdpa_for_head_dims_the_kernel_cannot_take():
    q, k, v, tables, seq_lens = random_case(2, 1, 2, 16, seed=9)
    q, k, v = q[..., :12], k[..., :12].contiguous(), v[..., :12].contiguous()
    meta = decode_meta(tables, seq_lens, None)
    got = CpuPagedBackend()._decode(q, k, v, meta)
    torch.testing.assert_close(got, TorchSDPABackend()._decode(q, k, v, meta))
