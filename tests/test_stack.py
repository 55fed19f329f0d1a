"""The disaggregated stack as separate OS processes (kvtransfer agent, 1 prefill, 2 decode,
proxy), started by the launcher behind `tokenpool up` and driven by a plain gRPC client."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import BAD_REQUESTS
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stack_helpers import (
    check_streamed,
    expected_streams,
    instance_status,
    measured_pace,
    start_tiny_stack,
    stream,
    wait_until_idle,
)
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc
from tokenpool.proxy.request_table import RequestRecord
from tokenpool.proxy.shm_request_table import ShmRequestTable

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral")
PROMPTS = ("The quick brown fox", "Numbers 12345 and more", "Hi there", "A longer prompt, with commas.",
           "A prompt long enough to need more than one block of sixteen tokens in the paged KV cache.")
TABLE_SLOTS = 48


@pytest.fixture(scope="module")
def stack(tiny_dir, tmp_path_factory):
    stack = start_tiny_stack(tiny_dir, MODELS, tmp_path_factory.mktemp("stack-logs"), prefill=1, decode=2,
                             table_slots=TABLE_SLOTS)
    yield stack
    codes = stack.stop()
    assert codes and all(code == 0 for _, code in codes), codes


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def test_forty_concurrent_streams_over_four_models_give_the_engines_greedy_tokens(stack, stub, tiny_dir):
    jobs = [(MODELS[i % 4], PROMPTS[i % len(PROMPTS)], (8, 16, 24)[i % 3]) for i in range(40)]
    expected = expected_streams(tiny_dir, jobs)
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: stream(stub, *job), jobs))
    for job, responses in zip(jobs, results, strict=True):
        check_streamed(job, responses, expected)
        num_prompt = expected[job][1]
        last = responses[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == num_prompt and last.usage.completion_tokens == job[2]
        assert last.usage.ttft_seconds > 0
        assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    served = set()
    for name in ("decode-0", "decode-1"):
        status = instance_status(stack, name)
        assert status.role == "decode" and sorted(status.models) == sorted(MODELS)
        served.add(status.active_model)
    assert served - {""}, "no decode instance ever ran a model"


def test_cancelling_streams_mid_way_frees_their_kv_and_table_slots(stack, stub):
    held = []
    for i in range(5):
        request = pb.GenerateRequest(model=MODELS[i % 4], text=PROMPTS[i % 2], request_id=f"cancel-{i}",
                                     sampling=pb.SamplingParams(max_tokens=480, ignore_eos=True))
        call = stub.Generate(request, timeout=120)
        next(call), next(call)  # the first token came from prefill; the second from a decode instance
        with ShmRequestTable.attach(stack.name) as table:
            assert table.find(request.request_id) is not None
        held += [s.kv_blocks_used + s.host_kv_used_bytes for s in map(
            lambda n: instance_status(stack, n), ("decode-0", "decode-1"))] if i == 0 else []
        call.cancel()
        assert call.code() == grpc.StatusCode.CANCELLED  # it had not finished
    assert sum(held) > 0, "no KV was held on a decode instance mid-stream"
    wait_until_idle(stack)
    assert len([t for r in stream(stub, "tiny-qwen2", "after", 8) for t in r.token_ids]) == 8


def test_a_full_request_table_refuses_at_once(stack, stub):
    """The table is the node's: fill its free slots from here, as other proxy workers would."""
    with ShmRequestTable.attach(stack.name) as table:
        slots = []
        try:
            while table.usage().free:
                filler = RequestRecord(request_id=f"filler-{len(slots)}", model="tiny-llama")
                slots.append(table.insert(filler))
            with pytest.raises(grpc.RpcError) as info:
                stream(stub, "tiny-mistral", "one too many", 4)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry later" in info.value.details()
        finally:
            for slot in slots:
                table.release(slot)
    assert len(stream(stub, "tiny-mistral", "room again", 4)[-1].token_ids) >= 1


@pytest.mark.parametrize("request_kwargs, code, needle", BAD_REQUESTS)
def test_bad_requests_get_the_right_status_and_the_stack_stays_up(stack, stub, request_kwargs, code, needle):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(**request_kwargs), timeout=30))
    assert info.value.code() == code
    assert needle in info.value.details()
    assert not stack.dead()
    assert len(stream(stub, "tiny-llama", "still up", 2)[-1].token_ids) >= 1


def test_a_deadline_ends_the_request_and_frees_its_kv(stack, stub):
    max_tokens = 1000
    ttft, tbt = measured_pace(stub, "tiny-qwen3")
    # a third of the way through the request's time at the measured pace: mid-decode on a machine
    # of any speed, and still if it runs twice as fast or as slow as measured
    deadline = ttft + max_tokens * tbt / 3
    request = pb.GenerateRequest(model="tiny-qwen3", text="slow", sampling=pb.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True))
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for response in stub.Generate(request, timeout=deadline):
            received += response.token_ids
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < len(received) < max_tokens, f"{len(received)} tokens by the {deadline:.2f} s deadline"
    wait_until_idle(stack)


def test_every_service_answers_health_checks(stack):
    for s in stack.services:
        with grpc.insecure_channel(s.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, s.name


def test_status_shows_instances_and_the_request_table(stack, stub, capsys):
    from tokenpool.cli.main import main

    done = threading.Event()
    call = stub.Generate(pb.GenerateRequest(model="tiny-mistral", text="status", request_id="stack-probe",
                                            sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True)),
                         timeout=60)
    next(call)
    try:
        assert main(["status", "--requests"]) == 0
    finally:
        call.cancel()
        done.set()
    out = capsys.readouterr().out
    for name in ("proxy", "prefill-0", "decode-0", "decode-1", "kvtransfer-0"):
        assert name in out, out
    assert f"{stack.name}: " in out and "stack-probe" in out
    assert "aegaeon; active" in out and "TBT target" in out and "alpha" in out, out
    assert re.search(r"switch time c [\d.]+ ms \(KV swap-ins x\d+\.\d\d the start-up rate's\)", out), out


def test_a_javascript_client_works_against_the_stack(stack, tiny_dir):
    client = Path(__file__).parent / "node_client"
    assert (client / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "run `npm ci --prefix tests/node_client` (.ci/run does)"
    args = ["node", str(client / "client.js"), stack.address, "tiny-qwen3", "10", "Hello from node"]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout)
    tokens, _, text = expected_streams(tiny_dir, [("tiny-qwen3", "Hello from node", 10)])[
        "tiny-qwen3", "Hello from node", 10]
    assert result["token_ids"] == tokens and result["text"] == text
    assert result["finish_reason"] == "FINISH_REASON_LENGTH" and result["usage"]["completion_tokens"] == 10


def test_status_removes_the_entry_of_a_stack_whose_launcher_was_killed(tmp_path, capsys, monkeypatch):
    from tokenpool.cli.main import main
    from tokenpool.engine import private_shm

    root = tmp_path / "shm"
    root.mkdir()
    monkeypatch.setattr(private_shm, "shm_root", lambda: root)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = root / "stack-1.stack.json"
    stale.write_text(json.dumps({"name": "stack-1", "pid": gone.pid, "table": "stack-1", "logs": "/nowhere",
                                 "services": []}))
    assert main(["status"]) == 0
    assert "launcher pid" in capsys.readouterr().out and not stale.exists()
