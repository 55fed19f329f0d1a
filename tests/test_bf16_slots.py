"""bf16 matrices in a switching instance's slots, computed in float32: how an instance serves a
bf16 model on a CPU without bf16 instructions (multi_model_engine.slot_dtypes,
bf16_linear.Bf16SlotLinear). compute_dtype="float32" forces that path, so every CPU runs it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from logit_recorder import LogitRecorder
from tokenpool.engine import cpu_extension
from tokenpool.engine.bf16_linear import MAX_SLOT_ROWS, Bf16SlotLinear
from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.engine.host_model_cache import HostModelCache, ModelConflictError
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.model_config import ModelConfig
from tokenpool.engine.multi_model_engine import (
    InstanceConfig,
    MultiModelEngine,
    instance_specs,
    slot_bytes_for,
    slot_dtypes,
)
from tokenpool.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not cpu_extension.available(),
                                reason=f"needs the C++ CPU kernels: {cpu_extension.unavailable_reason()}")

BF16_ON_FLOAT32 = EngineConfig(dtype="bfloat16", compute_dtype="float32")
FLOAT32_COPIES = EngineConfig(dtype="bfloat16", compute_dtype="float32", linear_kernel="dense")
# A prompt of about 200 tokens: its prefill runs the widened path (more than MAX_SLOT_ROWS rows).
LONG = " ".join(f"word{i} and then some more" for i in range(40))
PROMPTS = ["The quick brown fox", "Hi", LONG]
MAX_TOKENS = (6, 24)


@pytest.mark.parametrize("rows", [0, 1, 5, MAX_SLOT_ROWS, MAX_SLOT_ROWS + 1, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_the_slot_kernel_is_f_linear_on_the_widened_weight(rows, bias):
    torch.manual_seed(rows)
    weight = torch.randn(40, 96).to(torch.bfloat16)
    b = torch.randn(40) if bias else None
    x = torch.randn(rows, 96)
    kernel = Bf16SlotLinear()
    out = kernel.apply(x, kernel.prepare(weight), b)
    assert out.dtype == torch.float32 and out.shape == (rows, 40)
    torch.testing.assert_close(out, F.linear(x, weight.float(), b), rtol=1e-5, atol=1e-5)
    batched = kernel.apply(x.reshape(1, rows, 96), weight, b)  # [batch, tokens, in] as well
    torch.testing.assert_close(batched.reshape(rows, 40), out, rtol=1e-5, atol=1e-5)


def test_the_slot_kernel_refuses_weights_it_cannot_apply_as_they_lie():
    kernel = Bf16SlotLinear()
    with pytest.raises(ValueError, match="bfloat16"):
        kernel.prepare(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="contiguous"):
        kernel.prepare(torch.zeros(8, 4, dtype=torch.bfloat16).t())


def test_a_bf16_model_is_held_in_bf16_and_computed_in_float32(tiny_dir):
    folder = tiny_dir / "tiny-llama"
    config = ModelConfig.from_folder(folder)
    assert slot_dtypes(BF16_ON_FLOAT32, config) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert slot_dtypes(FLOAT32_COPIES, config) == (torch.bfloat16, torch.float32, torch.float32)
    specs = instance_specs(BF16_ON_FLOAT32, config)
    assert {s.dtype for s in specs if len(s.shape) == 2} == {torch.bfloat16}  # matrices
    assert {s.dtype for s in specs if len(s.shape) == 1} == {torch.float32}  # norms, biases
    narrow, wide = slot_bytes_for([folder], BF16_ON_FLOAT32), slot_bytes_for([folder], FLOAT32_COPIES)
    assert narrow < 0.56 * wide, (narrow, wide)


def test_the_float32_copies_an_older_tokenpool_cached_are_replaced_and_a_changed_entry_refused(
        tiny_dir, shm_path):
    """An upgrade: /dev/shm still holds a model as tokenpool cached it before bf16 slots (float32
    copies, no layout in its metadata). The instance re-reads it once nobody has it attached; and
    an entry some other process put in another layout after registration is refused at the switch,
    never bound."""
    folder = tiny_dir / "tiny-llama"
    old_specs = instance_specs(FLOAT32_COPIES, ModelConfig.from_folder(folder))
    old_metadata = {"folder": str(folder), "dtype": "torch.float32"}
    cache = HostModelCache(shm_path / "cache", capacity_bytes=64 << 20, progress=False)
    cache.register("m", old_specs, lambda name, dest: dest.zero_(), old_metadata)
    pool = HostKVPool(16 << 20, slab_bytes=1 << 20, shm_dir=shm_path)
    config = InstanceConfig(kv_bytes=4 << 20, slot_bytes=slot_bytes_for([folder], FLOAT32_COPIES),
                            engine=BF16_ON_FLOAT32)
    instance = MultiModelEngine(config, cache, pool)
    lease = cache.attach("m")  # an old instance still running on the node
    with pytest.raises(ModelConflictError, match="older tokenpool's layout, still attached by a running"):
        instance.register("m", folder)
    assert not instance.models and cache.list()[0].nbytes == lease.nbytes
    lease.close()
    instance.register("m", folder)
    assert cache.counters.evictions == 1 and cache.list()[0].nbytes < 0.56 * lease.nbytes
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = LLMEngine(folder, FLOAT32_COPIES).generate([PROMPTS[0]], sampling)[0].output_token_ids
    seq = instance.add_request("m", PROMPTS[0], sampling)
    while instance.has_unfinished("m"):
        instance.step("m")
    assert seq.output_token_ids == expected

    instance.register("n", folder)  # registered, not yet copied into a slot: nothing attached
    cache.evict("n")
    cache.register("n", old_specs, lambda name, dest: dest.zero_(), {**old_metadata, "layout": "2"})
    instance.add_request("n", PROMPTS[0], sampling)
    with pytest.raises(ModelConflictError, match="'n' in the host cache is in another layout"):
        instance.step("n")
    assert instance.active == "m"
    new_specs = instance_specs(BF16_ON_FLOAT32, ModelConfig.from_folder(folder))
    with pytest.raises(ModelConflictError, match=r"different layout \(another dtype\?\)"):
        cache.register("n", new_specs, lambda name, dest: None, {"layout": "2"})  # current: not stale
    instance.close()
    pool.close()


@pytest.fixture
def make_instance(shm_path):
    """make(engine, folders) -> a MultiModelEngine with every folder registered; closed after."""
    made = []

    def make(engine: EngineConfig, folders) -> MultiModelEngine:
        cache = HostModelCache(shm_path / f"cache-{len(made)}", capacity_bytes=256 << 20, progress=False)
        pool = HostKVPool(64 << 20, slab_bytes=1 << 20, shm_dir=shm_path)
        config = InstanceConfig(kv_bytes=4 << 20, slot_bytes=slot_bytes_for(folders.values(), engine),
                                engine=engine)
        instance = MultiModelEngine(config, cache, pool)
        made.append((instance, pool))
        for name, folder in folders.items():
            instance.register(name, folder)
        return instance

    yield make
    for instance, pool in made:
        instance.close()
        pool.close()


def test_bf16_slots_give_the_logits_of_float32_copies(six_models, make_instance):
    """One long prompt per model through prefill and 24 decode steps: the bf16-held instance
    and one holding float32 copies (F.linear) compute the same float32 math up to summation
    order."""
    instances = [make_instance(engine, six_models) for engine in (BF16_ON_FLOAT32, FLOAT32_COPIES)]
    assert [i.models["tiny-llama"].profile.dtype for i in instances] == [torch.bfloat16, torch.float32]
    kernels = []
    for name in sorted(six_models):
        logits = []
        for instance in instances:
            instance.add_request(name, LONG, SamplingParams(max_tokens=24, ignore_eos=True))
            instance.switch_to(name)
            instance.runner.sampler = recorder = LogitRecorder()
            while instance.has_unfinished(name):
                instance.step(name)
            kernels.append(instance.runner.describe())
            logits.append(torch.cat(recorder.logits))
        assert logits[0].shape[0] == 24
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4, msg=name)
    assert all("linear bf16_slot" in k for k in kernels[::2]), kernels
    assert all("linear dense" in k for k in kernels[1::2]), kernels


def test_random_switching_over_bf16_slots_gives_each_sequence_its_single_engine_tokens(
        six_models, make_instance):
    expected = {}
    for name, folder in six_models.items():
        engine = LLMEngine(folder, FLOAT32_COPIES)
        for p, prompt in enumerate(PROMPTS):
            for n in MAX_TOKENS:
                seq = engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]
                expected[name, p, n] = seq.output_token_ids
    instance = make_instance(BF16_ON_FLOAT32, six_models)
    rng, names = random.Random(7), sorted(six_models)
    live = []
    for _ in range(200):
        name = rng.choice(names)
        if rng.random() < 0.5 and sum(s[0] == name and not s[3].is_finished for s in live) < 3:
            p, n = rng.randrange(len(PROMPTS)), rng.choice(MAX_TOKENS)
            live.append((name, p, n, instance.add_request(name, PROMPTS[p],
                                                          SamplingParams(max_tokens=n, ignore_eos=True))))
        if rng.random() < 0.3:
            instance.prefetch(rng.choice(names))
        instance.step(name)
    for name in names:
        while instance.has_unfinished(name):
            instance.step(name)
    assert instance.switches > 50 and len(live) > 20
    for name, p, n, seq in live:
        assert seq.output_token_ids == expected[name, p, n], (name, p, n)


def test_timing_profiles_are_keyed_by_the_compute_dtype_as_well_as_the_held_one(six_models, make_instance):
    """Profiles are cached per model shape: a bf16-held model computed in float32 and one computed
    in bf16 step at different speeds, so they must not share one."""
    from tokenpool.engine.step_profiler import profile_key

    folders = {"m": six_models["tiny-llama"]}
    native = EngineConfig(dtype="bfloat16", compute_dtype="native")
    held = [make_instance(engine, folders) for engine in (BF16_ON_FLOAT32, native, FLOAT32_COPIES)]
    assert [i.models["m"].profile.dtype for i in held] == [torch.bfloat16, torch.bfloat16, torch.float32]
    assert len({profile_key(i, "m") for i in held}) == 3
