"""Prefill on one switching engine, decode on another: handing the prompt's KV over gives
exactly the tokens of a single engine, across switches, with every block accounted for."""

from __future__ import annotations

import pytest
import torch
from tokenpool.engine.errors import InvalidRequestError
from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.engine.host_model_cache import HostModelCache
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine
from tokenpool.engine.sampling_params import SamplingParams

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral")
PROMPTS = ("The quick brown fox", "A longer prompt that spans more than one block of sixteen tokens.")


def make_engine(tmp_path, name, tiny_dir, max_num_seqs=64):
    from tokenpool.engine.scheduler import SchedulerConfig

    cache = HostModelCache(tmp_path / "cache", capacity_bytes=128 << 20, progress=False)
    pool = HostKVPool(16 << 20, slab_bytes=1 << 20, shm_dir=tmp_path)
    config = EngineConfig(dtype="float32", scheduler=SchedulerConfig(max_num_seqs=max_num_seqs))
    instance = InstanceConfig(kv_bytes=1 << 20, slot_bytes=8 << 20, engine=config)
    engine = MultiModelEngine(instance, cache, pool)
    for m in MODELS:
        engine.register(m, tiny_dir / m)
    return engine


def prefill(engine, model, prompt, sampling):
    """Run a prompt to its first token; -> (first token, seed, copied KV blocks)."""
    seq = engine.add_request(model, prompt, sampling)
    while seq.num_output_tokens == 0:
        engine.step(model)
    _, blocks = engine.handoff_blocks(model, seq.request_id)
    copies = [b.clone() for b in blocks]
    engine.abort(model, seq.request_id)
    return seq, copies


def test_handoff_between_engines_gives_the_single_engine_tokens(tmp_path, tiny_dir):
    expected = {}
    for m in MODELS:
        ref = LLMEngine(tiny_dir / m, EngineConfig(dtype="float32", linear_kernel="dense"))
        for p in PROMPTS:
            seq = ref.generate([p], SamplingParams(max_tokens=12, ignore_eos=True))[0]
            expected[m, p] = seq.output_token_ids
    prefiller = make_engine(tmp_path / "p", "p", tiny_dir)
    decoder = make_engine(tmp_path / "d", "d", tiny_dir, max_num_seqs=3)  # arrivals wait for room
    adopted = []
    for i, (m, p) in enumerate(expected):
        sampling = SamplingParams(max_tokens=12, ignore_eos=True)
        seq, blocks = prefill(prefiller, m, p, sampling)
        new = decoder.adopt(m, f"r{i}", seq.prompt_token_ids, seq.output_token_ids[0], sampling,
                            seq.seed, blocks)
        adopted.append((m, p, new))
        decoder.step(MODELS[i % len(MODELS)])  # interleave switches with arrivals
    while decoder.has_unfinished():
        for m in MODELS:
            if decoder.has_unfinished(m):
                decoder.step(m)
    for m, p, seq in adopted:
        assert seq.output_token_ids == expected[m, p], (m, p)
    assert prefiller.pool.stats().used_bytes == 0 and decoder.pool.stats().used_bytes == 0
    assert prefiller.kv_blocks_used == 0 and decoder.kv_blocks_used == 0


def test_abort_of_an_arriving_sequence_frees_its_staged_kv(tmp_path, tiny_dir):
    prefiller = make_engine(tmp_path / "p", "p", tiny_dir)
    decoder = make_engine(tmp_path / "d", "d", tiny_dir)
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    seq, blocks = prefill(prefiller, "tiny-llama", PROMPTS[1], sampling)
    first = seq.output_token_ids[0]
    decoder.adopt("tiny-llama", "r", seq.prompt_token_ids, first, sampling, seq.seed, blocks)
    assert decoder.pool.stats().used_bytes > 0 and decoder.num_requests("tiny-llama") == 1
    decoder.abort("tiny-llama", "r")
    assert decoder.pool.stats().used_bytes == 0 and not decoder.has_unfinished()


def test_adopt_refuses_bad_input_and_changes_nothing(tmp_path, tiny_dir):
    decoder = make_engine(tmp_path / "d", "d", tiny_dir)
    shape = decoder.models["tiny-llama"].shape
    block = torch.zeros(shape.dims, dtype=shape.torch_dtype)
    sampling = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="need 1 KV blocks, got 2"):
        decoder.adopt("tiny-llama", "r", [1, 2, 3], 5, sampling, 0, [block, block])
    with pytest.raises(ValueError, match="must be"):
        decoder.adopt("tiny-llama", "r", [1, 2, 3], 5, sampling, 0, [torch.zeros(3)])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        decoder.adopt("tiny-llama", "r", [1, 2, 3], 10**6, sampling, 0, [block])
    assert decoder.pool.stats().used_bytes == 0 and not decoder.has_unfinished()


def test_streamed_layers_equal_the_blocks_after_prefill_over_chunks(tmp_path, tiny_dir):
    """engine.stream_kv hands each layer out as the forward pass writes it; over a prefill cut into
    chunks (max_num_batched_tokens 12: chunk edges inside blocks) the assembled blocks equal the
    finished device blocks."""
    from tokenpool.engine.scheduler import SchedulerConfig

    cache = HostModelCache(tmp_path / "cache", capacity_bytes=128 << 20, progress=False)
    pool = HostKVPool(16 << 20, slab_bytes=1 << 20, shm_dir=tmp_path)
    config = EngineConfig(dtype="float32", scheduler=SchedulerConfig(max_num_batched_tokens=12))
    instance = InstanceConfig(kv_bytes=1 << 20, slot_bytes=8 << 20, engine=config)
    engine = MultiModelEngine(instance, cache, pool)
    engine.register("tiny-llama", tiny_dir / "tiny-llama")
    prompt = list(range(3, 43))  # 40 tokens, 3 blocks of 16; chunks [0,12) [12,24) [24,36) [36,40)
    seq = engine.add_request("tiny-llama", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    shape = engine.models["tiny-llama"].shape
    streamed = torch.full((3, *shape.dims), float("nan"))
    calls = []

    def sink(layer, first, kv_layer, block_ids):
        calls.append((layer, first, len(block_ids)))
        for j, b in enumerate(block_ids):
            streamed[first + j, layer] = kv_layer[:, b]
    engine.stream_kv("tiny-llama", seq.request_id, sink)
    while seq.num_output_tokens == 0:
        engine.step("tiny-llama")
    _, blocks = engine.handoff_blocks("tiny-llama", seq.request_id)
    assert torch.equal(streamed, torch.stack(blocks))
    assert sorted({(first, n) for _, first, n in calls}) == [(0, 1), (0, 2), (1, 2), (2, 1)]
    assert [layer for layer, _, _ in calls] == list(range(shape.num_layers)) * 4
    engine.abort("tiny-llama", seq.request_id)
    calls.clear()
    engine.step("tiny-llama")  # no sink left: nothing streams
    assert not calls
