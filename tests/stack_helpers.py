"""Helpers for tests that drive a stack of service processes (tokenpool.compose.launcher.Stack)."""

from __future__ import annotations

import time

import grpc
import pytest
from tokenpool.cli import internal_tls
from tokenpool.compose.launcher import Stack, StackConfig
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.engine.tokenizer import IncrementalDetokenizer
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.proxy.shm_request_table import ShmRequestTable

SMALL_STACK = {"port": 0, "dtype": "float32", "kv_mib": 8, "host_kv_mib": 32, "pool_mib": 32, "threads": 1}
"""StackConfig settings of the tests' stacks: tiny models, small memory, one thread an instance."""


def start_tiny_stack(tiny_dir, models, log_dir, **settings) -> Stack:
    """A started stack of the named tiny models (settings override SMALL_STACK and StackConfig's)."""
    config = StackConfig(models={m: tiny_dir / m for m in models}, **{**SMALL_STACK, **settings})
    stack = Stack(config, log_dir)
    stack.start(progress=lambda line: None)
    return stack


def service(stack, name):
    return next(s for s in stack.services if s.name == name)


SEEDED_TEMPERATURE = 0.8


def seeded_sampling(seed=None) -> dict:
    """The sampling fields of a job with a seed (sampled, reproducibly), or none (greedy)."""
    return {} if seed is None else {"temperature": SEEDED_TEMPERATURE, "seed": seed}


def expected_streams(tiny_dir, jobs):
    """Tokens, prompt length and streamed text of the single-process engine for each (model,
    prompt, n) job (greedy), or (model, prompt, n, seed) job (seeded_sampling)."""
    engines = {m: LLMEngine(tiny_dir / m, EngineConfig(dtype="float32")) for m in {job[0] for job in jobs}}
    expected = {}
    for job in set(jobs):
        model, prompt, n, *seed = job
        engine = engines[model]
        sampling = SamplingParams(max_tokens=n, ignore_eos=True, **seeded_sampling(*seed))
        seq = engine.generate([prompt], sampling)[0]
        detok = IncrementalDetokenizer(engine.tokenizer, ())
        text = ""
        for i, token in enumerate(seq.output_token_ids):
            detok.add(token)
            text += detok.delta(final=i == len(seq.output_token_ids) - 1)
        expected[job] = (seq.output_token_ids, seq.num_prompt_tokens, text)
    return expected


def check_streamed(job, responses, expected) -> None:
    """A job's streamed tokens and text are exactly the single-process engine's (expected_streams)."""
    tokens, _, text = expected[job]
    assert [t for r in responses for t in r.token_ids] == tokens, job
    assert "".join(r.text for r in responses) == text, job


def stream(stub, model, prompt, n, timeout=240):
    request = pb.GenerateRequest(model=model, text=prompt, sampling=pb.SamplingParams(
        max_tokens=n, ignore_eos=True))
    return list(stub.Generate(request, timeout=timeout))


def measured_pace(stub, model, n=128, repeats=3) -> tuple[float, float]:
    """(seconds to the first token, seconds per later token) of greedy streams of n tokens of
    `model` through the stack, measured now (the fastest of `repeats`; the first also makes the
    model active): what a test sizes its deadlines from, on a machine of any speed."""
    request = pb.GenerateRequest(model=model, text="pace", sampling=pb.SamplingParams(
        max_tokens=n, ignore_eos=True))
    paces = []
    for _ in range(repeats):
        start, times = time.monotonic(), []
        for response in stub.Generate(request, timeout=240):
            times += [time.monotonic()] * len(response.token_ids)
        paces.append((times[0] - start, (times[-1] - times[0]) / (len(times) - 1)))
    return min(ttft for ttft, _ in paces), min(tbt for _, tbt in paces)


def internal_channel(stack, name) -> grpc.Channel:
    """A channel to one of the stack's internal services, dialled as its own services do (over
    mutual TLS when the stack has it)."""
    return internal_tls.sync_channel(service(stack, name).address, stack.config.internal_tls())


def instance_status(stack, name) -> ipb.InstanceStatus:
    with internal_channel(stack, name) as channel:
        decode = name.startswith("decode")
        stub_class = instances_pb2_grpc.DecodeStub if decode else instances_pb2_grpc.PrefillStub
        return stub_class(channel).Status(ipb.StatusRequest(), timeout=10)


def agent_stats(stack, name="kvtransfer-0") -> ipb.PoolStats:
    with internal_channel(stack, name) as channel:
        return instances_pb2_grpc.KVTransferStub(channel).Stats(ipb.StatsRequest(), timeout=10)


def wait_until_idle(stack, instances=None, timeout=60.0):
    """Every table slot, hand-off block (of every node's agent) and block of the named instances
    (default: every live prefill and decode instance) free; cancellations land asynchronously."""
    if instances is None:
        instances = [s.name for s in stack.services if s.name.startswith(("prefill", "decode"))
                     and s.process.poll() is None]
    deadline = time.monotonic() + timeout
    while True:
        with ShmRequestTable.attach(stack.name) as table:
            used = table.usage().used
        stats = [agent_stats(stack, s.name) for s in stack.services if s.name.startswith("kvtransfer")
                 and s.process.poll() is None]
        statuses = [instance_status(stack, n) for n in instances]
        busy = [s.name for s in statuses if s.running or s.kv_blocks_used or s.host_kv_used_bytes
                or s.requests_by_model]
        if not used and not any(s.handles or s.used_bytes for s in stats) and not busy:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not idle after {timeout} s: table {used} slots, pool {stats}, busy {busy}: "
                        f"{statuses}")
        time.sleep(0.2)
