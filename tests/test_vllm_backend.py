"""The vLLM model backend (engine/vllm_backend/) against the native engine, float32 on the CPU:
the pinned internals it leans on, greedy tokens and logits through prefill and paged decode for
every tiny architecture and SmolLM2, the KV it writes read back through tokenpool's logical
view, and random switch-and-step cycles over four models of different shapes in one arena.

Needs vLLM importable (the `tokenpool[vllm]` extra); skipped otherwise."""

from __future__ import annotations

import random

import pytest
import torch
from tokenpool.engine.vllm_backend import INSTALL_HINT

pytest.importorskip("vllm", reason=f"the vLLM backend needs vllm: {INSTALL_HINT}")

from test_engine_parity import PROMPTS  # noqa: E402  (the native engine's parity prompts)
from tokenpool.engine.host_kv_pool import HostKVPool  # noqa: E402
from tokenpool.engine.host_model_cache import HostModelCache  # noqa: E402
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine  # noqa: E402
from tokenpool.engine.sampler import Sampler  # noqa: E402
from tokenpool.engine.sampling_params import SamplingParams  # noqa: E402

STEPS = 32


class _Recorder(Sampler):
    """Greedy sampling that keeps every step's logits, and each request's rows."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.rows: dict[str, list[torch.Tensor]] = {}

    def sample(self, logits, seqs):
        self.logits.append(logits.detach().clone())
        for row, seq in zip(self.logits[-1], seqs, strict=True):
            self.rows.setdefault(seq.request_id, []).append(row)
        return super().sample(logits, seqs)


def _run(folder, engine: str, steps: int = STEPS, **config):
    llm = LLMEngine(folder, EngineConfig(dtype="float32", kv_cache_bytes=16 << 20, engine=engine, **config))
    llm.runner.sampler = recorder = _Recorder()
    seqs = llm.generate(PROMPTS, SamplingParams(max_tokens=steps, ignore_eos=True))
    return llm, [s.output_token_ids for s in seqs], recorder.logits


def test_pinned_internals_hold():
    from tokenpool.engine.vllm_backend import conformance

    assert conformance.problems() == []


@pytest.mark.parametrize("linear", ["auto", "dense"])
def test_greedy_tokens_and_logits_match_the_native_engine(tiny_model, linear):
    """'auto': vLLM's own CPU linear packing (the single-model engine); 'dense': F.linear on the
    bound views, as weights in an arena slot are applied."""
    _, native_tokens, native_logits = _run(tiny_model, "native")
    llm, vllm_tokens, vllm_logits = _run(tiny_model, "vllm", linear_kernel=linear)
    assert "vllm (model" in llm.describe()
    assert vllm_tokens == native_tokens
    assert len(vllm_logits) == len(native_logits) == STEPS  # prompts prefilled together, then decodes
    worst = max((a - b).abs().max().item() for a, b in zip(vllm_logits, native_logits, strict=True))
    assert worst <= 1e-4, f"{tiny_model.name}: max |logit diff| {worst}"


def test_the_first_step_on_a_fresh_thread_runs_with_the_engines_thread_count(tiny_dir):
    """An instance builds its engine on the main thread (torch.set_num_threads there) and steps it on
    the engine worker's thread, where OpenMP has its default count until torch first runs a parallel
    op there. vLLM's CPU attention records omp_get_max_threads() when its metadata is built and
    checks it in the kernel: the stack's first decode step failed "Check failed: thread_num ==
    thread_num (2 vs. 1)" on an AVX-512 CPU. (On a 1-core machine the counts cannot differ.)"""
    from concurrent.futures import ThreadPoolExecutor

    folder = tiny_dir / "tiny-qwen3"  # a head size vLLM's kernel covers: attention is the kernel's
    _, expected, _ = _run(folder, "native", steps=4)
    before = torch.get_num_threads()
    try:
        llm = LLMEngine(folder, EngineConfig(dtype="float32", kv_cache_bytes=16 << 20, engine="vllm",
                                             num_threads=1))
        with ThreadPoolExecutor(1) as fresh:
            seqs = fresh.submit(llm.generate, PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True)).result()
    finally:
        torch.set_num_threads(before)
    assert [s.output_token_ids for s in seqs] == expected


def test_kv_lands_in_tokenpool_blocks_as_vllms_cpu_kernel_lays_it_out(tiny_dir):
    """vLLM's attention writes the same keys and values into the arena's blocks as the native engine,
    in its own block interior (per head: keys [head_dim, block_size], values [block_size, head_dim]);
    kv[:, :, b] (what swaps and hand-offs move) covers exactly block b's bytes."""
    folder = tiny_dir / "tiny-qwen3"
    native, _, _ = _run(folder, "native", steps=1)
    llm, _, _ = _run(folder, "vllm", steps=1)
    assert llm.kv_cache.layout == "head_major" and native.kv_cache.layout == "token_major"
    ref = native.kv_cache.kv  # [layers, 2, blocks, block_size, kv_heads, head_dim]
    assert ref.abs().sum() > 0  # the prompts' blocks (the rest is zeros in both)
    layers, _, blocks, bs, heads, dim = ref.shape
    phys = llm.kv_cache.physical.view(layers, blocks, heads, 2, -1)
    keys = phys[:, :, :, 0].view(layers, blocks, heads, dim, bs).permute(0, 1, 4, 2, 3)
    values = phys[:, :, :, 1].view(layers, blocks, heads, bs, dim).permute(0, 1, 3, 2, 4)
    assert (keys - ref[:, 0]).abs().max().item() <= 1e-5
    assert (values - ref[:, 1]).abs().max().item() <= 1e-5
    block = llm.kv_cache.kv.select(2, 3)
    start = llm.kv_cache.physical[:, 3].data_ptr() - llm.kv_cache.physical.data_ptr()
    assert {block.data_ptr() - llm.kv_cache.physical.data_ptr()} == {start}
    assert block.contiguous().view(layers, -1).numel() == llm.kv_cache.physical[:, 3].numel()


def test_random_switching_over_four_shapes_keeps_every_sequence_exact(tiny_dir, shm_path):
    names = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
    expected = {}
    for name in names:
        native = LLMEngine(tiny_dir / name, EngineConfig(dtype="float32", linear_kernel="dense"))
        for p, prompt in enumerate(PROMPTS):
            for n in (6, 20):
                seq = native.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]
                expected[(name, p, n)] = seq.output_token_ids
    cache = HostModelCache(shm_path / "cache", capacity_bytes=64 << 20, progress=False)
    pool = HostKVPool(32 << 20, slab_bytes=1 << 20, shm_dir=shm_path)
    config = InstanceConfig(kv_bytes=2 << 20, slot_bytes=4 << 20,
                            engine=EngineConfig(dtype="float32", engine="vllm"))
    engine = MultiModelEngine(config, cache, pool)
    try:
        for name in names:
            engine.register(name, tiny_dir / name)
        rng = random.Random(19)
        live, finished = [], []
        for _ in range(200):
            name = rng.choice(names)
            if rng.random() < 0.5 and sum(1 for s in live if s[0] == name) < 3:
                p, n = rng.randrange(len(PROMPTS)), rng.choice((6, 20))
                live.append((name, p, n, engine.add_request(name, PROMPTS[p],
                                                            SamplingParams(max_tokens=n, ignore_eos=True))))
            if rng.random() < 0.3:
                engine.prefetch(rng.choice(names))
            engine.step(name)
            finished += [s for s in live if s[3].is_finished]
            live = [s for s in live if not s[3].is_finished]
        for name in names:  # drain
            while engine.has_unfinished(name):
                engine.step(name)
        finished += live
        assert engine.switches > 50 and len(finished) > 20  # how many: swap-ins land on threads
        for name, p, n, seq in finished:
            assert seq.output_token_ids == expected[(name, p, n)], (name, p, n)
    finally:
        engine.close()


def test_smollm2_matches_the_native_engine(smollm2_dir):
    """A real model (30 layers, head_dim 64: vLLM's own CPU attention kernel)."""
    answers = {}
    for engine in ("native", "vllm"):
        llm = LLMEngine(smollm2_dir, EngineConfig(dtype="float32", kv_cache_bytes=32 << 20, engine=engine))
        seqs = llm.generate(["What is the capital of France?", PROMPTS[3]],
                            SamplingParams(max_tokens=24, ignore_eos=True), chat=True)
        answers[engine] = [s.output_token_ids for s in seqs]
    assert answers["vllm"] == answers["native"]
    assert "Paris" in llm.tokenizer.decode(answers["vllm"][0])


def test_the_stack_serves_forty_streams_over_four_models_with_the_vllm_engine(tiny_dir, tmp_path):
    """1 proxy, 1 prefill, 2 decode instances, all `--engine vllm`: KV handed from prefill to decode
    in vLLM's block layout, every stream the native single-process engine's greedy tokens."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from stack_helpers import check_streamed, expected_streams, start_tiny_stack, stream
    from tokenpool.protos.v1 import inference_pb2_grpc

    models = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral")
    stack = start_tiny_stack(tiny_dir, models, tmp_path, prefill=1, decode=2, engine="vllm")
    try:
        jobs = [(models[i % 4], PROMPTS[i % len(PROMPTS)], (8, 16, 24)[i % 3]) for i in range(40)]
        expected = expected_streams(tiny_dir, jobs)
        with grpc.insecure_channel(stack.address) as channel, ThreadPoolExecutor(len(jobs)) as pool:
            stub = inference_pb2_grpc.InferenceStub(channel)
            results = list(pool.map(lambda job: stream(stub, *job), jobs))
        for job, responses in zip(jobs, results, strict=True):
            check_streamed(job, responses, expected)
    finally:
        codes = stack.stop()
    assert codes and all(code == 0 for _, code in codes), codes
    for name in ("prefill-0", "decode-0", "decode-1"):
        assert "engine vllm" in (tmp_path / f"{name}.log").read_text(), name


def test_bf16_logits_are_as_close_to_float32_as_transformers_own_bf16(tiny_model):
    """test_bf16_parity.py's yardstick for the vLLM backend computing in bfloat16: prompts of 40 and
    200 tokens, 32 paged decode steps, logits teacher-forced against float32 transformers on the
    backend's own tokens, within NATIVE_RATIO x transformers' bf16 error on the same positions."""
    from test_bf16_parity import DECODE_STEPS, NATIVE_RATIO, PROMPT_LENS, prompts, reference, worst
    from tokenpool.engine.compute_dtype import cpu_has_native

    if not cpu_has_native(torch.bfloat16):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 / AMX): the backend would compute in float32")
    llm = LLMEngine(tiny_model, EngineConfig(dtype="bfloat16", compute_dtype="native",
                                             kv_cache_bytes=32 << 20, engine="vllm"))
    llm.runner.sampler = recorder = _Recorder()
    ids = prompts(llm.model_config.vocab_size)
    seqs = [llm.add_request(p, SamplingParams(max_tokens=DECODE_STEPS + 1, ignore_eos=True)) for p in ids]
    while llm.has_unfinished:
        llm.step()
    for prompt, seq, n in zip(ids, seqs, PROMPT_LENS, strict=True):
        got = torch.stack(recorder.rows[seq.request_id])
        sequence = prompt + seq.output_token_ids
        truth = reference(tiny_model, "f32", sequence, n)
        yardstick = worst(reference(tiny_model, "bf16", sequence, n), truth)
        err = worst(got, truth)
        print(f"{tiny_model.name} vllm bf16 prompt {n}: backend {err:.4f}, transformers bf16 {yardstick:.4f}")
        assert err <= NATIVE_RATIO * yardstick, (tiny_model.name, n, err, yardstick)
