"""Sampling: seeds, filters, stopping rules and bad values."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tokenpool.engine.errors import InvalidRequestError
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.sampler import Sampler
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.engine.sequence import FinishReason, Sequence


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return LLMEngine(tiny_dir / "tiny-mistral", EngineConfig(dtype="float32"))


def test_same_seed_same_tokens_whatever_the_batch(engine):
    seeded = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = engine.generate(["Once upon a time"], seeded)[0].output_token_ids
    others = [SamplingParams(max_tokens=n, temperature=0.7, seed=n, ignore_eos=True)
              for n in (5, 30, 12)]
    seqs = [engine.add_request(p, sp) for p, sp in zip(["a b c", "hello", "x" * 40], others, strict=True)]
    mine = engine.add_request("Once upon a time", seeded)
    while engine.has_unfinished:
        engine.step()
    assert mine.output_token_ids == alone
    assert len({tuple(s.output_token_ids) for s in seqs + [mine]}) == 4
    different = engine.generate(["Once upon a time"], SamplingParams(
        max_tokens=20, temperature=1.0, seed=4321, ignore_eos=True))[0].output_token_ids
    assert different != alone


def test_a_seeded_request_resumed_from_its_streamed_tokens_continues_the_same_stream(engine):
    # What the proxy does after losing an instance: the prompt plus the k tokens already
    # streamed, the same seed, and the draws going on from index k.
    full = engine.generate(["Once upon a time"], SamplingParams(
        max_tokens=20, temperature=1.0, seed=99, ignore_eos=True))[0]
    for k in (1, 7, 19):
        prompt = full.prompt_token_ids + full.output_token_ids[:k]
        resumed = engine.generate([prompt], SamplingParams(max_tokens=20 - k, temperature=1.0, seed=99,
                                                           ignore_eos=True, seed_offset=k))[0]
        assert resumed.output_token_ids == full.output_token_ids[k:], k
    restarted = engine.generate([full.prompt_token_ids + full.output_token_ids[:7]], SamplingParams(
        max_tokens=13, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert restarted.output_token_ids != full.output_token_ids[7:]  # what happened before the offset
    with pytest.raises(InvalidRequestError, match="seed_offset"):
        SamplingParams(seed_offset=-1)


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    greedy = engine.generate(["The river"], SamplingParams(max_tokens=12, ignore_eos=True))
    for sp in (SamplingParams(max_tokens=12, temperature=2.0, top_k=1, ignore_eos=True),
               SamplingParams(max_tokens=12, temperature=2.0, top_p=1e-6, ignore_eos=True)):
        assert engine.generate(["The river"], sp)[0].output_token_ids == greedy[0].output_token_ids


def test_filters_keep_only_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    seq = Sequence([1], SamplingParams(temperature=1.0, top_k=2))
    probs = Sampler._probs(logits, [seq])
    assert (probs[0, 2:] == 0).all() and probs[0, :2].sum().item() == pytest.approx(1.0)
    seq = Sequence([1], SamplingParams(temperature=1.0, top_p=0.8))
    probs = Sampler._probs(logits, [seq])  # p = .64, .24, .09, ... -> keep two
    assert (probs[0, 2:] == 0).all() and (probs[0, :2] > 0).all()


def test_max_tokens_stop_ids_and_stop_strings(engine):
    free = engine.generate(["Stop here"], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert free.num_output_tokens == 30 and free.finish_reason is FinishReason.LENGTH
    stop_at = free.output_token_ids[5]
    cut = engine.generate(["Stop here"], SamplingParams(
        max_tokens=30, stop_token_ids=(stop_at,), ignore_eos=True))[0]
    first = free.output_token_ids.index(stop_at)
    assert cut.output_token_ids == free.output_token_ids[:first + 1]
    assert cut.finish_reason is FinishReason.STOP
    text = engine.tokenizer.decode(free.output_token_ids)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    outs = list(engine.stream("Stop here", SamplingParams(max_tokens=30, stop=(stop,),
                                                          ignore_eos=True)))
    streamed = "".join(o.text for o in outs)
    assert streamed == text[:text.index(stop)]
    assert outs[-1].finish_reason is FinishReason.STOP


def test_eos_from_the_model_config_stops(engine, tiny_dir, tmp_path):
    free = engine.generate(["Stop here"], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    # A copy of the model whose generation_config names its third greedy token as EOS.
    folder = tmp_path / "eos-model"
    shutil.copytree(tiny_dir / "tiny-mistral", folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [free.output_token_ids[2]]
    (folder / "generation_config.json").write_text(json.dumps(config))
    other = LLMEngine(folder, EngineConfig(dtype="float32"))
    seq = other.generate(["Stop here"], SamplingParams(max_tokens=30))[0]
    first = free.output_token_ids.index(free.output_token_ids[2])
    assert seq.output_token_ids == free.output_token_ids[:first + 1]
    assert seq.finish_reason is FinishReason.STOP


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.5}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"seed": -3}, "seed"), ({"stop": ("",)}, "stop"), ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"logit_bias": {5: 100.5}}, "logit_bias"), ({"logit_bias": {5: float("nan")}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"logit_bias": {t: 1.0 for t in range(301)}}, "logit_bias"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": 10.5}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
])
def test_out_of_range_values_are_named(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context_is_rejected(engine):
    too_long = [5] * engine.max_model_len
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request(too_long)
    assert not engine.has_unfinished


def test_penalties_lower_the_logits_of_generated_tokens_before_each_pick(engine):
    """Each penalized greedy token is the argmax of that step's raw logits minus frequency x count
    minus presence x (count > 0) over the tokens generated before it; without penalties the
    tiny model repeats itself, with them it does not follow the same path."""
    from logit_recorder import LogitRecorder

    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.5}
    plain = engine.generate(["a b a b a b"], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    engine.runner.sampler = recorder = LogitRecorder()
    try:
        seq = engine.generate(["a b a b a b"], SamplingParams(max_tokens=24, ignore_eos=True, **penalties))[0]
    finally:
        engine.runner.sampler = Sampler()
    tokens = seq.output_token_ids
    raw = torch.cat(recorder.logits)
    assert raw.shape[0] == len(tokens) == 24
    for t, token in enumerate(tokens):
        counts = torch.bincount(torch.tensor(tokens[:t], dtype=torch.long), minlength=raw.shape[1]).float()
        expected = raw[t] - 1.5 * counts - 0.5 * (counts > 0).float()
        assert token == int(expected.argmax()), t
    assert tokens != plain.output_token_ids
    assert len(set(tokens)) > len(set(plain.output_token_ids))  # fewer repeats


def test_logit_bias_and_the_repetition_penalty_adjust_each_pick(engine):
    """A +100 bias makes its token every greedy pick, a -100 one keeps the unbiased run's first
    token out; with a repetition penalty each greedy token is the argmax of that step's raw logits
    with the prompt's and generated tokens' positive logits divided by it and negative ones
    multiplied, bias added first; a bias past the vocabulary is refused before anything queues."""
    from logit_recorder import LogitRecorder

    prompt = "a b a b a b"
    plain = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].output_token_ids
    forced = engine.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True,
                                                      logit_bias={7: 100.0}))[0]
    assert forced.output_token_ids == [7] * 6
    banned = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True,
                                                      logit_bias={plain[0]: -100.0}))[0].output_token_ids
    assert plain[0] not in banned
    sampling = SamplingParams(max_tokens=16, ignore_eos=True, repetition_penalty=1.8, logit_bias={9: 0.5})
    engine.runner.sampler = recorder = LogitRecorder()
    try:
        seq = engine.generate([prompt], sampling)[0]
    finally:
        engine.runner.sampler = Sampler()
    raw = torch.cat(recorder.logits)
    for t, token in enumerate(seq.output_token_ids):
        row = raw[t].clone()
        row[9] += 0.5
        seen = torch.tensor(sorted(set(seq.prompt_token_ids) | set(seq.output_token_ids[:t])))
        row[seen] = torch.where(row[seen] > 0, row[seen] / 1.8, row[seen] * 1.8)
        assert token == int(row.argmax()), t
    assert seq.output_token_ids != plain + plain[:4]
    with pytest.raises(InvalidRequestError, match="logit_bias token id .* outside the vocabulary"):
        engine.add_request(prompt, SamplingParams(logit_bias={engine.model_config.vocab_size: 1.0}))
    assert not engine.has_unfinished


def test_a_penalized_request_resumed_from_its_streamed_tokens_counts_them(tiny_dir):
    """After a re-dispatch the streamed tokens are part of the prompt (seed_offset of them): the
    penalties still count them, so the resumed stream is the undisturbed one, greedy or seeded.
    (Seeded on this prompt, tiny-llama draws tokens it drew before the offset again: a resumed
    stream that forgot them would differ at every k here.)"""
    engine = LLMEngine(tiny_dir / "tiny-llama", EngineConfig(dtype="float32"))
    for extra in ({}, {"temperature": 1.0, "seed": 7}):
        sampling = {"ignore_eos": True, "presence_penalty": 1.0, "frequency_penalty": 0.7, **extra}
        full = engine.generate(["a b a b a b"], SamplingParams(max_tokens=20, **sampling))[0]
        for k in (3, 6, 12):
            prompt = full.prompt_token_ids + full.output_token_ids[:k]
            again = SamplingParams(max_tokens=20 - k, seed_offset=k, **sampling)
            resumed = engine.generate([prompt], again)[0]
            assert resumed.output_token_ids == full.output_token_ids[k:], (extra, k)
