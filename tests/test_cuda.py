"""The CUDA paths, on a GPU machine (skipped without one; CI has none): the step runs on
the device, model slots fill by DMA on a copy stream after the compute that last read
them, KV round-trips through a pinned pool. The switching test in
test_model_switching.py runs on CUDA too."""

from __future__ import annotations

import pytest
import torch
from logit_recorder import LogitRecorder
from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.engine.host_model_cache import HostModelCache
from tokenpool.engine.kv_swapper import KVSwapper
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.model_switcher import _STAGING_BYTES, CudaSlotCopier, register_model
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.engine.slab_allocator import BlockShape

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (run on a GPU machine)")


def _first_logits(folder, device: str) -> tuple[list[int], torch.Tensor]:
    engine = LLMEngine(folder, EngineConfig(dtype="float32", linear_kernel="dense",
                                            attention_backend="sdpa", device=device))
    engine.runner.sampler = recorder = LogitRecorder()
    seq = engine.generate(["The quick brown fox jumps over the lazy dog"],
                          SamplingParams(max_tokens=8, ignore_eos=True))[0]
    return seq.output_token_ids, torch.cat(recorder.logits)


def test_engine_on_cuda_computes_what_the_cpu_computes(tiny_model):
    cpu_tokens, cpu_logits = _first_logits(tiny_model, "cpu")
    cuda_tokens, cuda_logits = _first_logits(tiny_model, "cuda")
    # float32 with different reduction orders: the prefill's logits agree closely; later steps
    # compare only while the tokens fed back are the same.
    pairs = enumerate(zip(cpu_tokens, cuda_tokens, strict=True))
    same = next((i for i, (a, b) in pairs if a != b), len(cpu_tokens))
    assert same >= 1
    torch.testing.assert_close(cuda_logits[:same], cpu_logits[:same], atol=2e-4, rtol=1e-4)


def _copy_after_compute(copier: CudaSlotCopier, src: torch.Tensor) -> torch.Tensor:
    """Queue slow compute that writes dest, then the copy ordered after it: dest must end as src."""
    dest = torch.empty(src.numel(), dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(50_000_000)  # tens of ms of GPU time queued before the write below
    dest.fill_(7)
    after = torch.cuda.current_stream().record_event()
    copier.copy(dest, src, after)
    return dest


def test_slot_copies_land_after_the_compute_before_them_pinned_or_staged():
    copier = CudaSlotCopier(torch.device("cuda"))
    nbytes = 2 * _STAGING_BYTES + 12345  # three staged pieces: both buffers reused once
    gen = torch.Generator().manual_seed(0)
    pageable = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    pinned = pageable.clone().pin_memory()
    for src in (pinned, pageable):
        dest = _copy_after_compute(copier, src)
        assert torch.equal(dest.cpu(), src)
    assert copier._staging is not None  # the pageable source went through the staging buffers


def test_kv_round_trip_through_a_pinned_pool_is_exact_and_ordered(shm_path):
    shape = BlockShape(num_layers=4, block_size=16, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    dims = (shape.num_layers, 2, 64, shape.block_size, shape.num_kv_heads, shape.head_dim)
    kv = torch.randn(dims, device="cuda").to(shape.torch_dtype)
    ids, new_ids = [3, 9, 10, 40], [60, 0, 33, 2]
    with HostKVPool(4 << 20, 1 << 20, shm_dir=shm_path, pin=True) as pool, KVSwapper(pool) as swapper:
        torch.cuda._sleep(50_000_000)
        kv[:, :, ids] += 1  # compute still queued when the swap-out is asked for: it must be copied
        want = kv[:, :, ids].clone()
        out = swapper.swap_out(kv, ids, shape)
        offsets = out.result()
        kv[:, :, ids] = float("nan")  # the blocks go to another sequence
        back = swapper.swap_in(kv, offsets, new_ids, shape)
        back.wait()
        assert torch.equal(kv[:, :, new_ids], want)
        assert out.gbps > 0 and back.gbps > 0
        swapper.release(offsets)
        assert pool.stats().used_bytes == 0


def test_a_lease_of_the_shared_memory_cache_is_page_locked_for_dma(tiny_dir, shm_path):
    """In /dev/shm (tmpfs) as deployed: the lease's bytes are DMA-able, the slot copier says so."""
    cache = HostModelCache(shm_path / "cache", capacity_bytes=64 << 20, progress=False)
    register_model(cache, "m", tiny_dir / "tiny-llama", torch.float32)
    copier = CudaSlotCopier(torch.device("cuda"))
    with cache.attach("m") as lease:
        copier.pin(lease)
        assert copier.pinned_leases == 1 and lease.raw.is_pinned()
        dest = torch.empty(lease.raw.numel(), dtype=torch.uint8, device="cuda")
        copier.copy(dest, lease.raw, None)
        assert torch.equal(dest.cpu(), lease.raw)
