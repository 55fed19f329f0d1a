"""HostKVPool and KVSwapper on the CPU: KV round trips through the shared-memory pool, bit for bit."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from tokenpool.engine.host_kv_pool import POOL_PREFIX, HostKVPool
from tokenpool.engine.kv_swapper import KVSwapper
from tokenpool.engine.slab_allocator import BlockShape, KVPoolFullError

SLAB = 16 << 10
A = BlockShape(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")  # 1536 B, 10 a slab
B = BlockShape(num_layers=2, block_size=4, num_kv_heads=1, head_dim=16, dtype="bfloat16")  # 512 B, 32 a slab


def device_kv(shape: BlockShape, num_blocks: int, seed: int) -> torch.Tensor:
    """A random device cache: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]."""
    gen = torch.Generator().manual_seed(seed)
    dims = (shape.num_layers, 2, num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    return torch.randn(dims, generator=gen).to(shape.torch_dtype)


@pytest.fixture
def pool(tmp_path):
    with HostKVPool(8 * SLAB, SLAB, shm_dir=tmp_path) as pool:
        yield pool


def test_round_trip_to_other_block_ids_is_exact(pool):
    # (cache, shape, a sequence's blocks, the free blocks it comes back to)
    cases = [(device_kv(A, 16, seed=0), A, [3, 7, 1], [0, 15, 8]),
             (device_kv(B, 40, seed=1), B, list(range(5, 30)), list(range(39, 14, -1)))]
    with KVSwapper(pool, workers=2) as swapper:
        outs = [swapper.swap_out(kv, ids, shape) for kv, shape, ids, _ in cases]  # both in flight
        expected = [kv[:, :, ids].clone() for kv, _, ids, _ in cases]
        for (kv, shape, ids, _), handle in zip(cases, outs, strict=True):
            assert handle.result() == handle.offsets and handle.nbytes == len(ids) * shape.nbytes
            kv[:, :, ids] = float("nan")  # the device blocks go to another sequence
        ins = [swapper.swap_in(kv, out.offsets, new, shape)
               for (kv, shape, _, new), out in zip(cases, outs, strict=True)]
        for (kv, _, _, new), handle, want in zip(cases, ins, expected, strict=True):
            handle.wait()
            assert torch.equal(kv[:, :, new], want)
            assert handle.direction == "in" and handle.seconds >= 0
        swapper.release(ins[0].offsets + ins[1].offsets)
    assert pool.stats().free_slabs == pool.stats().total_slabs


def test_many_concurrent_swaps(pool):
    kv = device_kv(A, 48, seed=2)
    sequences = [list(range(i, 48, 8)) for i in range(8)]  # 8 sequences of 6 interleaved blocks
    original = kv.clone()
    with KVSwapper(pool, workers=3) as swapper:
        outs = [swapper.swap_out(kv, ids, A) for ids in sequences]
        offsets = [h.result() for h in outs]
        kv.zero_()
        ins = [swapper.swap_in(kv, off, ids, A) for off, ids in zip(offsets, sequences, strict=True)]
        for handle in ins:
            handle.wait()
        swapper.release([o for off in offsets for o in off])
    assert torch.equal(kv, original)
    assert pool.stats().used_bytes == 0


def test_pool_full_raises_at_call_time_and_keeps_the_pool_consistent(tmp_path):
    with HostKVPool(2 * SLAB, SLAB, shm_dir=tmp_path) as pool, KVSwapper(pool) as swapper:
        kv = device_kv(A, 32, seed=3)
        first = swapper.swap_out(kv, list(range(15)), A)  # 1.5 slabs
        before = pool.stats()
        with pytest.raises(KVPoolFullError):
            swapper.swap_out(kv, list(range(15, 21)), A)
        assert pool.stats() == before
        second = swapper.swap_out(kv, list(range(15, 20)), A)  # exactly fills the pool
        assert len(set(first.result() + second.result())) == 20
        swapper.release(first.result() + second.result())
        assert pool.stats().free_slabs == 2


def test_in_flight_blocks_cannot_be_released_or_swapped_in(pool):
    kv = device_kv(A, 8, seed=4)
    with KVSwapper(pool, workers=1) as swapper:
        gate = threading.Event()
        swapper._executor.submit(gate.wait)  # hold the only worker so the next swap stays queued
        handle = swapper.swap_out(kv, [0, 1], A)
        with pytest.raises(ValueError, match="still being copied"):
            swapper.release(handle.offsets)
        with pytest.raises(ValueError, match="still being copied"):
            swapper.swap_in(kv, handle.offsets, [2, 3], A)
        assert not handle.done()
        gate.set()
        swapper.release(handle.result())


def test_bad_requests_raise_before_anything_moves(pool):
    kv = device_kv(A, 8, seed=5)
    with KVSwapper(pool) as swapper:
        for bad in (lambda: swapper.swap_out(kv, [8], A), lambda: swapper.swap_out(kv, [1, 1], A),
                    lambda: swapper.swap_out(kv.to(torch.bfloat16), [0], A),
                    lambda: swapper.swap_out(kv, [0], B)):
            with pytest.raises(ValueError):
                bad()
        assert pool.stats().used_bytes == 0
        offsets = swapper.swap_out(kv, [0, 1], A).result()
        with pytest.raises(ValueError, match="2 pool offsets for 1"):
            swapper.swap_in(kv, offsets, [3], A)
        with pytest.raises(ValueError, match="not a live block"):
            swapper.swap_in(kv, [offsets[0] + 4], [3], A)
        with pytest.raises(ValueError, match="holds"):
            pool.block_view(offsets[0], B)


def test_block_view_aliases_the_pool_buffer(pool):
    (offset,) = pool.alloc(B, 1)
    view = pool.block_view(offset, B)
    assert view.shape == (2, 2, 4, 1, 16) and view.dtype == torch.bfloat16
    view.fill_(3)
    assert torch.equal(pool.block_view(offset, B), torch.full_like(view, 3))
    pool.free([offset])
    with pytest.raises(ValueError):
        pool.block_view(offset, B)


def test_shm_file_is_private_and_removed_on_close(tmp_path):
    pool = HostKVPool(SLAB, SLAB, shm_dir=tmp_path)
    assert pool.path.parent.name.startswith("tokenpool-")
    assert stat.S_IMODE(pool.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pool.path.parent.stat().st_mode) == 0o700
    assert pool.path.stat().st_size == SLAB
    view = pool.block_view(pool.alloc(A, 1)[0], A)
    pool.close()
    assert not pool.path.exists()
    view.fill_(1)  # a view outliving close() keeps its pages rather than dangling
    pool.close()  # idempotent


def test_missing_shm_dir_falls_back_to_anonymous_memory(tmp_path):
    with pytest.warns(UserWarning, match="anonymous"):
        pool = HostKVPool(SLAB, SLAB, shm_dir=tmp_path / "absent")
    with pool:
        assert pool.path is None
        (offset,) = pool.alloc(A, 1)
        pool.block_view(offset, A).fill_(2)
        assert pool.block_view(offset, A).sum().item() == 2 * A.nbytes // 4


POOL_OWNER = """
import sys, time
from pathlib import Path
from tokenpool.engine.host_kv_pool import HostKVPool
pool = HostKVPool(1 << 20, 1 << 20, shm_dir=Path(sys.argv[1]))
print(pool.path, flush=True)
time.sleep(3600)
"""


def test_a_pool_file_left_by_a_killed_process_is_removed_by_the_next_pool(tmp_path):
    owners = [subprocess.Popen([sys.executable, "-c", POOL_OWNER, str(tmp_path)], stdout=subprocess.PIPE,
                               text=True) for _ in range(2)]
    try:
        paths = [Path(owner.stdout.readline().strip()) for owner in owners]
        assert all(p.exists() for p in paths)
        owners[0].kill()  # SIGKILL: no close(), no finalizer
        owners[0].wait(10)
        assert paths[0].exists()  # what a crash leaves behind
        with HostKVPool(SLAB, SLAB, shm_dir=tmp_path) as pool:
            assert not paths[0].exists()  # its owner's lock died with it: swept
            assert paths[1].exists()  # a live owner's file stays
            assert pool.path.exists() and pool.path.name.startswith(POOL_PREFIX)
        assert not pool.path.exists()
        assert [p.name for p in pool.path.parent.iterdir()] == [paths[1].name]  # no staging files left
    finally:
        for owner in owners:
            owner.kill()
            owner.wait(10)
