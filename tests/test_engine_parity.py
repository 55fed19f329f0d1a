"""The engine against transformers in float32: logits after prefill and every paged
decode step, and greedy tokens, for a batch of prompts of different lengths."""

from __future__ import annotations

import pytest
import torch
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.engine.scheduler import SchedulerConfig

PROMPTS = [
    "The quick brown fox",
    "Numbers like 12345 and 678 appear in the middle of sentences, and punctuation too!",
    "Hi",
    "A longer prompt that keeps going, so that it spans more than one block of sixteen "
    "tokens in the paged cache and exercises the block table across boundaries.",
]
LOGIT_STEPS = 32
TOKEN_STEPS = 64


def reference(folder, prompt_ids: list[list[int]], steps: int):
    """transformers' greedy tokens and per-step logits, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    results = []
    with torch.inference_mode():
        for ids in prompt_ids:
            input_ids = torch.tensor([ids])  # explicit mask: id 0 is BOS here, not padding
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 eos_token_id=None, pad_token_id=0)
            results.append((out.sequences[0, len(ids):].tolist(), torch.stack(out.logits)[:, 0]))
    return results


def run_engine(engine: LLMEngine, prompt_ids, steps: int):
    """Greedy tokens and the logits of each step, captured at the model's logits call."""
    captured: list[torch.Tensor] = []
    original = engine.model.logits

    def capture(hidden):
        captured.append(original(hidden))
        return captured[-1]

    engine.model.logits = capture
    seqs = [engine.add_request(ids, SamplingParams(max_tokens=steps, ignore_eos=True))
            for ids in prompt_ids]
    while engine.has_unfinished:
        engine.step()
    del engine.model.logits
    return seqs, captured


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_logits_and_greedy_tokens_match_transformers(tiny_model, attention):
    engine = LLMEngine(tiny_model, EngineConfig(dtype="float32", kv_cache_bytes=16 << 20,
                                                attention_backend=attention))
    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(ids) for ids in prompt_ids}) == len(prompt_ids)
    ref = reference(tiny_model, prompt_ids, TOKEN_STEPS)
    seqs, logits = run_engine(engine, prompt_ids, TOKEN_STEPS)
    assert len(logits) == TOKEN_STEPS  # one step per token: all prompts prefilled together
    for step in range(LOGIT_STEPS + 1):
        for row, (_, ref_logits) in enumerate(ref):
            diff = (logits[step][row] - ref_logits[step]).abs().max().item()
            assert diff <= 1e-4, f"{tiny_model.name} step {step} prompt {row}: max |diff| {diff}"
    for seq, (ref_tokens, _) in zip(seqs, ref, strict=True):
        assert seq.output_token_ids == ref_tokens


def test_chunked_prefill_and_late_joiners_give_the_same_tokens(tiny_dir):
    """Prompts split over steps and requests joining mid-stream change nothing."""
    folder = tiny_dir / "tiny-qwen3"
    alone = LLMEngine(folder, EngineConfig(dtype="float32", kv_cache_bytes=16 << 20))
    prompt_ids = [alone.tokenizer.encode(p) for p in PROMPTS]
    expected = [s.output_token_ids for s in alone.generate(
        prompt_ids, SamplingParams(max_tokens=24, ignore_eos=True))]
    chunked = LLMEngine(folder, EngineConfig(
        dtype="float32", kv_cache_bytes=16 << 20,
        scheduler=SchedulerConfig(max_num_batched_tokens=7)))
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    seqs = [chunked.add_request(prompt_ids[0], sampling)]
    for ids in prompt_ids[1:]:  # the others join while earlier ones decode
        for _ in range(3):
            chunked.step()
        seqs.append(chunked.add_request(ids, sampling))
    while chunked.has_unfinished:
        chunked.step()
    assert [s.output_token_ids for s in seqs] == expected


def test_preemption_under_kv_pressure_keeps_tokens(tiny_dir):
    folder = tiny_dir / "tiny-llama"
    roomy = LLMEngine(folder, EngineConfig(dtype="float32", kv_cache_bytes=16 << 20))
    prompt_ids = [roomy.tokenizer.encode(p) for p in PROMPTS]
    sampling = SamplingParams(max_tokens=40, ignore_eos=True)
    expected = [s.output_token_ids for s in roomy.generate(prompt_ids, sampling)]
    from tokenpool.engine.kv_cache import PagedKVCache

    block = PagedKVCache.bytes_per_block(roomy.model_config, 16, torch.float32)
    tight = LLMEngine(folder, EngineConfig(dtype="float32", kv_cache_bytes=block * 9))
    assert tight.kv_cache.num_blocks == 9  # fewer than the 4 sequences need together
    assert [s.output_token_ids for s in tight.generate(prompt_ids, sampling)] == expected


@pytest.mark.parametrize("kernel", ["dense", "onednn"])
def test_linear_kernels_agree(tiny_dir, kernel):
    folder = tiny_dir / "tiny-qwen2"
    engine = LLMEngine(folder, EngineConfig(dtype="float32", linear_kernel=kernel))
    ids = engine.tokenizer.encode(PROMPTS[1])
    (tokens, _), = reference(folder, [ids], 16)
    assert engine.generate([ids], SamplingParams(max_tokens=16, ignore_eos=True))[0] \
        .output_token_ids == tokens
