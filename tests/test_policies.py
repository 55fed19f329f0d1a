"""The scheduling policies live, on stacks of separate processes: Aegaeon's token-level
switching with SLO-derived quotas, and the `request` and `static` baselines."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import grpc
import pytest
from tokenpool.compose.launcher import Stack, StackConfig
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc

PROMPTS = ("The quick brown fox", "Numbers 12345 and more", "Hi there",
           "A prompt long enough to need more than one block of sixteen tokens in the paged KV cache.")


def start_stack(models, tmp_path_factory, **config):
    settings = dict(prefill=1, decode=1, port=0, dtype="float32", kv_mib=16, host_kv_mib=64, pool_mib=32,
                    threads=1)
    stack = Stack(StackConfig(models=models, **{**settings, **config}), tmp_path_factory.mktemp("logs"))
    stack.start(progress=lambda line: None)
    return stack


def stop_stack(stack):
    codes = stack.stop()
    assert all(code == 0 for _, code in codes), codes


def status(stack, name) -> ipb.InstanceStatus:
    address = next(s.address for s in stack.services if s.name == name)
    with grpc.insecure_channel(address) as channel:
        decode = name.startswith("decode")
        stub = instances_pb2_grpc.DecodeStub if decode else instances_pb2_grpc.PrefillStub
        return stub(channel).Status(ipb.StatusRequest(), timeout=10)


LONG_TOKENS = 1000  # near tiny-llama's 1024-token context: the longest request it takes


def timed_stream(stub, model, prompt, max_tokens, first: threading.Event | None = None):
    """-> (token ids, [(arrival time, tokens in the message)], last response); `first` is set
    at the first token."""
    request = pb.GenerateRequest(model=model, text=prompt, sampling=pb.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True))
    tokens, times, last = [], [], None
    for response in stub.Generate(request, timeout=300):
        times.append((time.monotonic(), len(response.token_ids)))
        tokens += response.token_ids
        last = response
        if first is not None:
            first.set()
    return tokens, times, last


def start_long_stream(pool, stub):
    """A long tiny-llama stream, returned once it decodes (its first token is in)."""
    first = threading.Event()
    long = pool.submit(timed_stream, stub, "tiny-llama", PROMPTS[0], LONG_TOKENS, first)
    while not first.wait(0.05):
        if long.done():
            long.result()  # raises what ended it
            pytest.fail("the long stream ended without a token")
    return long


def greedy(folder, prompt, max_tokens):
    engine = LLMEngine(folder, EngineConfig(dtype="float32"))
    seq = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0]
    return seq.output_token_ids


def token_times(times) -> list[float]:
    """Each token's arrival (a message of k tokens brings k tokens at once)."""
    return [t for t, n in times for _ in range(n)]


def steady_window(streams) -> tuple[float, float]:
    """From the moment every stream is decoding (its second token is in) to the first stream's end:
    the stretch in which every batch is in the round."""
    return max(token_times(s)[1] for s in streams), min(token_times(s)[-1] for s in streams)


def mean_tbt_in(times, start: float, end: float) -> float:
    """Mean time between tokens of a stream within [start, end], over whole rounds: from the first
    token of its first turn that begins in the window to the first token of its last, divided by the
    tokens in between. A stream's tokens come in one burst per round, so a span that cut bursts at
    its ends would be off by up to a burst (a quarter of the mean in a window of four rounds)."""
    inside = [t for t in token_times(times) if start <= t <= end]
    assert len(inside) >= 2, f"{len(inside)} tokens in the window"
    gaps = [b - a for a, b in pairwise(inside)]
    long_gap = 2 * (inside[-1] - inside[0]) / len(gaps)  # between turns; within one, a step apart
    firsts = [k + 1 for k, gap in enumerate(gaps) if gap > long_gap]
    assert len(firsts) >= 3, f"fewer than two whole rounds in the window: {len(firsts)} turn starts"
    return (inside[firsts[-1]] - inside[firsts[0]]) / (firsts[-1] - firsts[0])


def test_aegaeon_switches_per_token_turns_and_holds_mean_tbt_at_alpha_times_the_target(
        six_models, tmp_path_factory):
    # Turns of about 15 steps: with a few steps a turn, a step more or less (KV landing later than
    # predicted on a busy machine) moved a stream's mean TBT by a fifth.
    stack = start_stack(six_models, tmp_path_factory, qmax_s=0.1)
    try:
        models, max_tokens = list(six_models), 320
        jobs = [(models[i % 6], PROMPTS[i % len(PROMPTS)]) for i in range(12)]
        expected = {job: greedy(six_models[job[0]], job[1], max_tokens) for job in set(jobs)}
        switches_before = status(stack, "decode-0").switches
        samples, done = [], threading.Event()

        def watch():  # alpha * d of rounds that cover all six batches, and when
            while not done.is_set():
                s = status(stack, "decode-0")
                if len(s.quotas_s) == 6:
                    samples.append((time.monotonic(), s.alpha * s.tbt_target_s))
                    assert s.round_switch_s > 0 and s.kv_swap_correction >= 1, s
                time.sleep(0.05)

        with grpc.insecure_channel(stack.address) as channel, ThreadPoolExecutor(13) as pool:
            stub = inference_pb2_grpc.InferenceStub(channel)
            watcher = pool.submit(watch)
            futures = []
            for model, prompt in jobs:  # arrivals interleaved across the models
                futures.append(pool.submit(timed_stream, stub, model, prompt, max_tokens))
                time.sleep(0.02)
            results = [f.result() for f in futures]
            done.set()
            watcher.result()
        for job, (tokens, _, last) in zip(jobs, results, strict=True):
            assert tokens == expected[job], job
            assert last.usage.completion_tokens == max_tokens and last.usage.ttft_seconds > 0
        switches = status(stack, "decode-0").switches - switches_before
        assert switches >= 3 * 6, f"only {switches} switches: the batches did not take turns mid-stream"
        assert all(len(times) >= 4 for _, times, _ in results), "some stream arrived in one turn"
        start, end = steady_window([times for _, times, _ in results])
        assert end - start > 1.0, "too short a stretch with every batch in the round"
        in_window = [target for t, target in samples if start <= t <= end]
        assert len(in_window) >= 3, "never saw a round with all six batches"
        target = statistics.mean(in_window)  # alpha * d as the rounds of the window planned it
        for model in models:
            streams = [times for (m, _), (_, times, _) in zip(jobs, results, strict=True) if m == model]
            measured = statistics.mean(mean_tbt_in(times, start, end) for times in streams)
            # At or under the target (steps while a batch's KV lands serve its landed sequences
            # beyond the quota, so streams may run a little ahead), not over it by more than noise.
            assert 0.65 * target <= measured <= 1.25 * target, (model, measured, target)
    finally:
        stop_stack(stack)


def test_request_level_scaling_blocks_a_later_model_behind_a_long_request(six_models, tmp_path_factory):
    models = {m: six_models[m] for m in ("tiny-llama", "tiny-qwen2")}
    stack = start_stack(models, tmp_path_factory, policy="request")
    try:
        with grpc.insecure_channel(stack.address) as channel, ThreadPoolExecutor(2) as pool:
            stub = inference_pb2_grpc.InferenceStub(channel)
            long = start_long_stream(pool, stub)  # the long request holds the decode instance
            short_start = time.monotonic()
            _, short_times, short_last = timed_stream(stub, "tiny-qwen2", PROMPTS[1], 4)
            long_tokens, long_times, _ = long.result()
        assert len(long_tokens) == LONG_TOKENS
        assert short_start < long_times[-1][0], "the short request came after the long one ended"
        # Head-of-line blocking: the later model's first token waited for the whole long request.
        assert short_times[0][0] >= long_times[-1][0]
        assert short_last.usage.ttft_seconds >= long_times[-1][0] - short_start - 0.05
        assert status(stack, "decode-0").policy == "request"
    finally:
        stop_stack(stack)


def test_static_pins_each_model_to_its_instances_and_never_switches(six_models, tmp_path_factory):
    models = {m: six_models[m] for m in ("tiny-qwen3", "tiny-mistral")}
    stack = start_stack(models, tmp_path_factory, policy="static", prefill=2, decode=2)
    names = [f"{role}-{i}" for role in ("prefill", "decode") for i in range(2)]
    try:
        with grpc.insecure_channel(stack.address) as channel, ThreadPoolExecutor(6) as pool:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for model in models:  # warm-up: each instance activates its model (profiling left another)
                timed_stream(stub, model, "warm up", 2)
            before = {n: status(stack, n).switches for n in names}
            jobs = [(m, p) for p in PROMPTS[:3] for m in models]
            results = list(pool.map(lambda job: timed_stream(stub, *job, 24), jobs))
        for (model, prompt), (tokens, _, _) in zip(jobs, results, strict=True):
            assert tokens == greedy(models[model], prompt, 24)
        for name in names:
            s = status(stack, name)
            assert s.policy == "static" and s.active_model == list(models)[int(name[-1])], s
            assert s.switches == before[name], f"{name} switched under the static policy"
    finally:
        stop_stack(stack)


def test_under_aegaeon_a_later_model_does_not_wait_for_a_long_request(six_models, tmp_path_factory):
    models = {m: six_models[m] for m in ("tiny-llama", "tiny-qwen2")}
    stack = start_stack(models, tmp_path_factory, qmax_s=0.05)
    try:
        with grpc.insecure_channel(stack.address) as channel, ThreadPoolExecutor(2) as pool:
            stub = inference_pb2_grpc.InferenceStub(channel)
            long = start_long_stream(pool, stub)
            _, short_times, _ = timed_stream(stub, "tiny-qwen2", PROMPTS[1], 4)
            long_tokens, long_times, _ = long.result()
        assert len(long_tokens) == LONG_TOKENS
        assert short_times[-1][0] < long_times[-1][0], "the short request waited for the long one"
    finally:
        stop_stack(stack)


@pytest.mark.parametrize("flags, needle", [
    (["--policy", "nope"], "invalid choice: 'nope'"),
    (["--tbt-ms", "0.0001"], "TBT target 0.0001 ms is below the fastest decode step"),
    (["--qmax-s", "0"], "QMAX must be a positive number of seconds, got 0.0"),
])
def test_bad_decode_settings_are_refused_at_start_naming_the_value(tiny_dir, flags, needle):
    args = [sys.executable, "-m", "tokenpool.decode_svc", "--kvtransfer", "127.0.0.1:1", "--threads", "1",
            "--kv-mib", "4", "--host-kv-mib", "8", f"--model=tiny-llama={tiny_dir / 'tiny-llama'}", *flags]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert needle in out.stderr, out.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--policy", "nope"], "unknown scheduling policy 'nope'"),
    (["--policy", "static", "--decode", "1"], "the static policy pins each model"),
    (["--qmax-s", "-1"], "qmax_s (QMAX) must be positive, got -1.0"),
])
def test_bad_stack_settings_are_refused_by_tokenpool_up(tiny_dir, flags, needle):
    models = [f"--model={m}={tiny_dir / m}" for m in ("tiny-llama", "tiny-qwen2")]
    out = subprocess.run([sys.executable, "-m", "tokenpool.cli.main", "up", "--port", "0", *models, *flags],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert needle in out.stderr, out.stderr
