"""One instance, five models of different shapes, 1,000 random switch-and-step
cycles: every sequence gets exactly the greedy tokens of a fresh single-model
engine, and afterwards every slab, block and arena byte is accounted for."""

from __future__ import annotations

import math
import random
import resource
import shutil
import time

import pytest
import torch
from conftest import cut_layers
from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.engine.host_model_cache import HostModelCache, ModelInUseError
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine
from tokenpool.engine.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox", "Numbers 12345 and more", "Hi",
           "A longer prompt that spans more than one block of sixteen tokens in the paged cache."]
MAX_TOKENS = (6, 20, 40)


@pytest.fixture(scope="module")
def five_models(tiny_dir, tmp_path_factory):
    """The four tiny models plus a two-layer cut of tiny-mistral: five distinct shapes."""
    root = tmp_path_factory.mktemp("five")
    folders = {name: shutil.copytree(tiny_dir / name, root / name)
               for name in ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral")}
    folders["tiny-mistral-2l"] = cut_layers(tiny_dir / "tiny-mistral", root / "tiny-mistral-2l", 2)
    return folders


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")


def expected_tokens(folders, device: str = "cpu") -> dict[tuple[str, int, int], list[int]]:
    expected = {}
    for name, folder in folders.items():
        engine = LLMEngine(folder, EngineConfig(dtype="float32", linear_kernel="dense", device=device))
        for p, prompt in enumerate(PROMPTS):
            for n in MAX_TOKENS:
                seq = engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]
                expected[(name, p, n)] = seq.output_token_ids
    return expected


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_random_switching_keeps_every_sequence_exact(five_models, shm_path, device):
    """On CUDA: weights DMA'd from the page-locked cache on a copy stream, KV swapped through
    a pinned pool, both ordered against compute by events."""
    expected = expected_tokens(five_models, device)
    cache = HostModelCache(shm_path / "cache", capacity_bytes=256 << 20, progress=False)
    pool = HostKVPool(64 << 20, slab_bytes=1 << 20, shm_dir=shm_path, pin=device == "cuda")
    engine = MultiModelEngine(InstanceConfig(kv_bytes=2 << 20, slot_bytes=8 << 20,
                                             engine=EngineConfig(dtype="float32", device=device)),
                              cache, pool)
    for name, folder in five_models.items():
        engine.register(name, folder)
    rng = random.Random(2026)
    names = sorted(five_models)
    live, finished = [], []
    rss_after_warmup = None
    for cycle in range(1000):
        name = rng.choice(names)
        if rng.random() < 0.5 and sum(1 for s in live if s[0] == name) < 3:
            p, n = rng.randrange(len(PROMPTS)), rng.choice(MAX_TOKENS)
            seq = engine.add_request(name, PROMPTS[p], SamplingParams(max_tokens=n, ignore_eos=True))
            live.append((name, p, n, seq))
        if rng.random() < 0.3:
            engine.prefetch(rng.choice(names))
        engine.step(name)
        finished += [s for s in live if s[3].is_finished]
        live = [s for s in live if not s[3].is_finished]
        if cycle == 100:
            rss_after_warmup = rss_mib()
    for name in names:  # drain
        while engine.has_unfinished(name):
            engine.step(name)
    finished += live
    assert engine.switches > 300
    assert len(finished) > 40  # how many finish depends on when async swap-ins land
    for name, p, n, seq in finished:
        assert seq.output_token_ids == expected[(name, p, n)], (name, p, n)
    # Everything is accounted for: no pool slab or device block is held by anyone.
    stats = pool.stats()
    assert stats.used_bytes == 0 and stats.free_slabs == stats.total_slabs
    for model in engine.models.values():
        blocks = model.book.scheduler.blocks
        assert blocks.num_free_blocks == blocks.num_blocks
        assert not model.swapped and not model.landing
    for region in (engine.arena.kv, *engine.arena.slots):
        assert 0 <= region.used <= region.capacity
    assert rss_mib() - rss_after_warmup < 64, "resident memory grew past 64 MiB after warm-up"
    if device == "cuda":  # every lease was page-locked: every fill was one DMA, none staged
        assert engine.switcher.cuda_copier.pinned_leases == len(five_models)
    engine.close()
    pool.close()


def test_bad_registrations_leave_cache_and_arena_untouched(five_models, tmp_path):
    cache = HostModelCache(tmp_path / "cache", capacity_bytes=64 << 20, progress=False)
    pool = HostKVPool(8 << 20, slab_bytes=1 << 20, shm_dir=tmp_path)
    engine = MultiModelEngine(InstanceConfig(kv_bytes=1 << 20, slot_bytes=2 << 20,
                                             engine=EngineConfig(dtype="float32")), cache, pool)
    with pytest.raises(MemoryError, match="arena model slot holds"):
        engine.register("big", five_models["tiny-llama"])  # 2.4 MiB of weights, 2 MiB slots
    corrupt = shutil.copytree(five_models["tiny-qwen2"], tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="do not fit"):
        engine.register("corrupt", corrupt)
    with pytest.raises(ValueError, match="no config.json"):
        engine.register("missing", tmp_path / "nowhere")
    assert cache.list() == [] and engine.models == {}
    engine.register("ok", five_models["tiny-mistral-2l"])
    with pytest.raises(KeyError, match="not registered"):
        engine.add_request("big", "hi")
    engine.close()
    pool.close()


def test_a_full_host_kv_pool_refuses_the_switch_and_keeps_the_active_model(five_models, tmp_path):
    folder = five_models["tiny-llama"]
    alone = LLMEngine(folder, EngineConfig(dtype="float32", linear_kernel="dense"))
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = alone.generate([PROMPTS[3]], sampling)[0].output_token_ids
    cache = HostModelCache(tmp_path / "cache", capacity_bytes=64 << 20, progress=False)
    block = 3 * 2 * 16 * 2 * 16 * 4  # tiny-llama: layers x (k, v) x 16 tokens x kv heads x head_dim x f32
    pool = HostKVPool(2 * block, slab_bytes=2 * block, shm_dir=tmp_path)  # room for two blocks
    engine = MultiModelEngine(InstanceConfig(kv_bytes=1 << 20, slot_bytes=8 << 20,
                                             engine=EngineConfig(dtype="float32")), cache, pool)
    engine.register("a", folder)
    engine.register("b", five_models["tiny-qwen2"])
    seq = engine.add_request("a", PROMPTS[3], sampling)
    engine.add_request("b", "hi", sampling)
    engine.step("a")  # the prompt fills three blocks: more than the pool holds
    with pytest.raises(MemoryError, match="host KV blocks"):
        engine.step("b")
    assert engine.active == "a" and pool.stats().used_bytes == 0
    while not seq.is_finished:
        engine.step("a")
    assert seq.output_token_ids == expected
    engine.step("b")  # nothing of a's left to swap: b runs
    assert engine.active == "b"
    engine.close()
    pool.close()


def _instance_and_llama_tokens(five_models, tmp_path):
    """An empty instance (64 MiB host cache, 8 MiB host KV pool) and what a single-model engine
    generates for tiny-llama on the long prompt with the sampling returned."""
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = LLMEngine(five_models["tiny-llama"], EngineConfig(dtype="float32", linear_kernel="dense"))
    expected = alone.generate([PROMPTS[3]], sampling)[0].output_token_ids
    cache = HostModelCache(tmp_path / "cache", capacity_bytes=64 << 20, progress=False)
    pool = HostKVPool(8 << 20, slab_bytes=1 << 20, shm_dir=tmp_path)
    engine = MultiModelEngine(InstanceConfig(kv_bytes=1 << 20, slot_bytes=8 << 20,
                                             engine=EngineConfig(dtype="float32")), cache, pool)
    return engine, pool, cache, sampling, expected


@pytest.mark.parametrize("failure", ["disk read", "slot fill"])
def test_a_failed_switch_leaves_the_active_model_exact(five_models, tmp_path, failure):
    """A switch that fails (the incoming model's weights cannot be read from disk, or its slot
    cannot be filled after the active model's KV went to the host pool) raises to its caller;
    the active model's sequences go on with exactly their tokens."""
    from tokenpool.engine.model_catalogue import ModelCatalogue

    engine, pool, cache, sampling, expected = _instance_and_llama_tokens(five_models, tmp_path)
    catalogue = ModelCatalogue(engine)
    catalogue.add("a", five_models["tiny-llama"])
    catalogue.add("b", five_models["tiny-qwen2"])
    seq = engine.add_request("a", PROMPTS[3], sampling)
    for _ in range(3):
        engine.step("a")
    if failure == "disk read":
        def broken():
            def fail(name, dest):
                raise OSError("disk read failed")
            return fail
        engine.tiers._fills["b"] = broken
    else:
        def refuse(profile):
            raise MemoryError("slot fill failed")
        engine.switcher.activate = refuse
    with pytest.raises((OSError, MemoryError), match=f"{failure} failed"):
        engine.switch_to("b")
    assert engine.active == "a"
    while not seq.is_finished:
        engine.step("a")
    assert seq.output_token_ids == expected
    engine.close()
    pool.close()
    assert pool.stats().used_bytes == 0


def test_discarding_the_prefetched_model_empties_its_slot_and_lets_go_of_it(five_models, tmp_path):
    """What removing a model from the catalogue does to the slot it was prefetched into: the slot
    is free, the host cache may drop the model, and the active model keeps its exact tokens."""
    engine, pool, cache, sampling, expected = _instance_and_llama_tokens(five_models, tmp_path)
    engine.register("a", five_models["tiny-llama"])
    engine.register("b", five_models["tiny-qwen2"])
    seq = engine.add_request("a", PROMPTS[3], sampling)
    engine.step("a")
    engine.switcher.prefetch(engine.models["b"].profile).result()
    assert engine.switcher.is_prefetched("b")
    with pytest.raises(ModelInUseError):
        cache.evict("b")  # the slot's fill holds a lease on it
    engine.switcher.discard("b")
    assert not engine.switcher.is_prefetched("b") and engine.active == "a"
    cache.evict("b")
    while not seq.is_finished:
        engine.step("a")
    assert seq.output_token_ids == expected
    engine.close()
    pool.close()


def test_a_decode_instance_measures_its_kv_swaps_once_for_every_model(five_models, tmp_path):
    """The round-robin plans each turn's swap-in from these (decode_svc/decode_scheduler.py): one
    measurement of the swapper, scaled to each model's block bytes."""
    from tokenpool.engine.step_profiler import kv_swap_for, measure_kv_swaps

    cache = HostModelCache(tmp_path / "cache", capacity_bytes=64 << 20, progress=False)
    pool = HostKVPool(8 << 20, slab_bytes=1 << 20, shm_dir=tmp_path)
    engine = MultiModelEngine(InstanceConfig(kv_bytes=1 << 20, slot_bytes=8 << 20,
                                             engine=EngineConfig(dtype="float32")), cache, pool)
    for name in ("tiny-llama", "tiny-qwen2", "tiny-mistral-2l"):
        engine.register(name, five_models[name])
    swaps = measure_kv_swaps(engine)
    assert set(swaps) == set(engine.models)
    rates = {(t.out_gbps, t.in_gbps, t.block_size) for t in swaps.values()}
    assert len(rates) == 1 and all(r > 0 for r in next(iter(rates))[:2])
    for name, times in swaps.items():
        assert times.block_bytes == engine.models[name].shape.nbytes
        assert times.seconds(33, "in") == pytest.approx(3 * times.seconds(16, "in"))  # whole blocks
        assert times.seconds(1, "in") > 0
    engine.register("late", five_models["tiny-qwen3"])
    late = kv_swap_for(swaps["tiny-llama"], engine, "late")
    assert late.block_bytes == engine.models["late"].shape.nbytes
    assert late.in_gbps == swaps["tiny-llama"].in_gbps
    assert pool.stats().used_bytes == 0  # the measurement gave its blocks back
    engine.close()
    pool.close()


def test_the_engine_says_when_a_switchs_kv_swap_in_has_landed(five_models, tmp_path):
    """What the decode round-robin times its turns by (kv_landed_at): None while the KV the last
    switch to a model swapped in is on its way, then when it all landed; -inf when that switch
    had none to swap in. The landed batch decodes on exactly as alone."""
    engine, pool, cache, sampling, expected = _instance_and_llama_tokens(five_models, tmp_path)
    for name in ("tiny-llama", "tiny-qwen2"):
        engine.register(name, five_models[name])
    seqs = [engine.add_request("tiny-llama", PROMPTS[3], sampling) for _ in range(3)]
    for _ in range(4):
        engine.step("tiny-llama")
    assert engine.kv_landed_at("tiny-llama") == -math.inf  # its first switch had nothing to swap in
    engine.switch_to("tiny-qwen2")
    assert engine.kv_landed_at("tiny-qwen2") == -math.inf
    before = time.monotonic()
    engine.switch_to("tiny-llama")  # the three sequences' KV comes back from the pool
    assert engine.last_switch.kv_in == 3
    first = engine.kv_landed_at("tiny-llama")  # None, unless all three landed already
    assert first is None or first >= before
    for handle in engine.models["tiny-llama"].switched_in:
        handle.wait()
    landed = engine.kv_landed_at("tiny-llama")
    assert landed is not None and before <= landed <= time.monotonic()
    while engine.has_unfinished("tiny-llama"):
        engine.step("tiny-llama")
    assert all(seq.output_token_ids == expected for seq in seqs)
    assert engine.kv_landed_at("tiny-llama") == landed  # until the next switch to it
    engine.close()
    pool.close()
