"""SlabAllocator as pure logic: offsets and counters, no memory."""

from __future__ import annotations

import random

import pytest
import torch
from tokenpool.engine.kv_cache import PagedKVCache
from tokenpool.engine.model_config import ModelConfig
from tokenpool.engine.slab_allocator import BlockShape, KVPoolFullError, SlabAllocator

SLAB = 4096
A = BlockShape(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")  # 1024 B, 4 a slab
B = BlockShape(num_layers=3, block_size=4, num_kv_heads=1, head_dim=8, dtype="bfloat16")  # 384 B, 10 a slab
C = BlockShape(num_layers=1, block_size=2, num_kv_heads=1, head_dim=32, dtype="float32")  # 512 B, 8 a slab


def test_block_bytes():
    assert (A.nbytes, B.nbytes, C.nbytes) == (1024, 384, 512)
    allocator = SlabAllocator(4 * SLAB, SLAB)
    assert [allocator.blocks_per_slab(s) for s in (A, B, C)] == [4, 10, 8]


def test_block_shape_of_config_matches_the_device_cache():
    config = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3})
    shape = BlockShape.of(config, 16, torch.bfloat16)
    assert shape == BlockShape(30, 16, 3, 64, "bfloat16")
    assert shape.nbytes == PagedKVCache.bytes_per_block(config, 16, torch.bfloat16)


def test_alloc_and_free_across_three_shapes():
    allocator = SlabAllocator(8 * SLAB, SLAB)
    a, b, c = allocator.alloc(A, 5), allocator.alloc(B, 3), allocator.alloc(C, 8)
    assert len(set(a + b + c)) == 16
    assert a[:4] == [0, 1024, 2048, 3072] and a[4] == SLAB  # a full slab, then the next one
    stats = allocator.stats()
    assert stats.slabs_by_shape == {A: 2, B: 1, C: 1} and stats.free_slabs == 4
    allocator.free(a + c)
    assert allocator.stats().slabs_by_shape == {B: 1}
    allocator.free(b)
    assert allocator.stats().free_slabs == 8


def test_partly_used_slabs_fill_before_empty_ones_fullest_first():
    allocator = SlabAllocator(4 * SLAB, SLAB)
    first, second = allocator.alloc(A, 4), allocator.alloc(A, 4)
    allocator.free(first[:3] + second[:1])  # slab 0 holds 1 block, slab 1 holds 3
    assert allocator.alloc(A, 1) == [second[0]]  # the fuller slab first
    assert allocator.alloc(A, 2) == [first[2], first[1]]  # then slab 0, before opening slab 2
    assert allocator.stats().free_slabs == 2


def test_failed_alloc_changes_nothing():
    allocator = SlabAllocator(3 * SLAB, SLAB)
    allocator.alloc(A, 3)
    allocator.alloc(B, 7)
    before = allocator.stats()
    with pytest.raises(KVPoolFullError, match=r"need 6 blocks .* 5 free") as err:
        allocator.alloc(A, 6)  # 1 left in slab 0 + 4 in the empty slab
    assert isinstance(err.value, MemoryError)
    assert allocator.stats() == before
    assert len(allocator.alloc(A, 5)) == 5


def test_empty_slab_returns_and_takes_another_shape():
    allocator = SlabAllocator(SLAB, SLAB)
    allocator.free(allocator.alloc(A, 4))
    assert allocator.stats().slabs_by_shape == {}
    assert allocator.alloc(B, 10) == [i * 384 for i in range(10)]
    with pytest.raises(KVPoolFullError):
        allocator.alloc(C, 1)


def test_bad_frees_raise_and_change_nothing():
    allocator = SlabAllocator(2 * SLAB, SLAB)
    offsets = allocator.alloc(A, 2)
    before = allocator.stats()
    for bad in ([offsets[0], 512], [offsets[1], SLAB], [offsets[0], offsets[0]], [offsets[0], -1]):
        with pytest.raises(ValueError):
            allocator.free(bad)
        assert allocator.stats() == before
    allocator.free(offsets[:1])
    with pytest.raises(ValueError, match="double free"):
        allocator.free(offsets[:1])


def test_bad_construction_and_oversized_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="100"):
        SlabAllocator(SLAB, 100)
    with pytest.raises(ValueError, match="1000"):
        SlabAllocator(1000, SLAB)
    with pytest.raises(ValueError, match="more than a slab"):
        SlabAllocator(SLAB, 512).alloc(A, 1)
    with pytest.raises(ValueError, match="int8"):
        BlockShape(1, 1, 1, 1, "int8")


def test_utilization_and_fragmentation_worked_example():
    allocator = SlabAllocator(4 * SLAB, SLAB)
    allocator.alloc(A, 5)  # 5120 bytes over 2 slabs
    allocator.alloc(B, 3)  # 1152 bytes in 1 slab
    stats = allocator.stats()
    assert stats.used_bytes == 6272
    assert stats.utilization == pytest.approx(6272 / 16384)
    # 3 open slabs = 12288 bytes, of which 6016 hold no block (B's slab tail included)
    assert stats.fragmentation == pytest.approx(6016 / 12288)
    empty = SlabAllocator(SLAB, SLAB).stats()
    assert (empty.utilization, empty.fragmentation) == (0.0, 0.0)


def check_invariants(allocator: SlabAllocator, live: dict[int, BlockShape]) -> None:
    slab_shapes: dict[int, BlockShape] = {}
    for offset, shape in live.items():
        slab, within = divmod(offset, SLAB)
        assert slab < allocator.num_slabs and within + shape.nbytes <= SLAB
        assert within % shape.nbytes == 0 and offset % shape.itemsize == 0
        assert slab_shapes.setdefault(slab, shape) == shape, "a slab holds one shape"
        assert allocator.shape_at(offset) == shape
    stats = allocator.stats()
    assert stats.used_bytes == sum(s.nbytes for s in live.values())
    assert sum(stats.slabs_by_shape.values()) == len(slab_shapes), "empty slabs go back"
    assert stats.free_slabs + len(slab_shapes) == stats.total_slabs


def test_random_alloc_free_keeps_invariants():
    rng = random.Random(1234)
    shapes = [A, B, C, BlockShape(1, 4, 1, 8, "float16")]
    allocator = SlabAllocator(12 * SLAB, SLAB)
    live: dict[int, BlockShape] = {}
    groups: list[list[int]] = []
    for _ in range(2000):
        if groups and rng.random() < 0.45:
            group = groups.pop(rng.randrange(len(groups)))
            allocator.free(group)
            for offset in group:
                del live[offset]
        else:
            shape, before = rng.choice(shapes), allocator.stats()
            try:
                group = allocator.alloc(shape, rng.randint(1, 12))
            except KVPoolFullError:
                assert allocator.stats() == before
                continue
            assert not live.keys() & set(group), "an offset handed out twice"
            live.update(dict.fromkeys(group, shape))
            groups.append(group)
        check_invariants(allocator, live)
    for group in groups:
        allocator.free(group)
    stats = allocator.stats()
    assert stats.free_slabs == stats.total_slabs and stats.utilization == 0.0
