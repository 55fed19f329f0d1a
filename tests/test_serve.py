"""`tokenpool serve` as a real process, driven by a plain gRPC client."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import BAD_REQUESTS
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral")
PROMPTS = ("The quick brown fox", "Numbers 12345 and more", "Hi there", "A longer prompt, with commas.")


def start_server(tiny_dir, *extra):
    args = [sys.executable, "-m", "tokenpool.cli.main", "serve", "--port", "0", "--kv-mib", "16",
            "--host-kv-mib", "64", *extra] + [f"--model={m}={tiny_dir / m}" for m in MODELS]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def server(tiny_dir):
    proc = start_server(tiny_dir)
    line = proc.stdout.readline()
    match = re.search(r"on 127\.0\.0\.1:(\d+)", line)
    assert match, f"no address in {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
    address = f"127.0.0.1:{match.group(1)}"
    yield address
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "shutting down" in proc.stderr.read()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def generate(stub, model, text, max_tokens=16, **sampling):
    request = pb.GenerateRequest(model=model, text=text, sampling=pb.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True, **sampling))
    return list(stub.Generate(request, timeout=120))


def test_concurrent_streams_give_the_engines_greedy_tokens(stub, tiny_dir):
    jobs = [(m, p) for m in MODELS for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: generate(stub, *job), jobs))
    engines = {m: LLMEngine(tiny_dir / m, EngineConfig(dtype="float32")) for m in MODELS}
    for (model, prompt), responses in zip(jobs, results, strict=True):
        engine = engines[model]
        expected = engine.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0]
        tokens = [t for r in responses for t in r.token_ids]
        assert tokens == expected.output_token_ids, (model, prompt)
        last = responses[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == expected.num_prompt_tokens
        assert last.usage.completion_tokens == 16 and last.usage.ttft_seconds > 0
        assert "".join(r.text for r in responses) == engine.tokenizer.decode(tokens)
        assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


@pytest.mark.parametrize("request_kwargs, code, needle", BAD_REQUESTS)
def test_bad_requests_get_the_right_status_and_the_server_stays_up(stub, request_kwargs, code, needle):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(**request_kwargs), timeout=30))
    assert info.value.code() == code
    assert needle in info.value.details()
    assert [m.id for m in stub.ListModels(pb.ListModelsRequest()).models] == list(MODELS)


def test_a_cancelled_stream_does_not_disturb_others(stub):
    call = stub.Generate(pb.GenerateRequest(model="tiny-qwen2", text="long", sampling=pb.SamplingParams(
        max_tokens=500, ignore_eos=True)), timeout=60)
    for _, _ in zip(range(3), call, strict=False):
        pass
    call.cancel()
    assert len([t for r in generate(stub, "tiny-qwen2", "after") for t in r.token_ids]) == 16


def test_health_and_reflection(server):
    with grpc.insecure_channel(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="tokenpool.v1.Inference"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "tokenpool.v1.Inference" in services and "grpc.health.v1.Health" in services


def test_a_full_request_table_refuses_at_once_and_a_cancel_frees_the_slot(tiny_dir):
    proc = start_server(tiny_dir, "--table-slots", "1")
    try:
        address = "127.0.0.1:" + re.search(r":(\d+) ", proc.stdout.readline()).group(1)
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            long = pb.GenerateRequest(model="tiny-qwen2", text="long", sampling=pb.SamplingParams(
                max_tokens=500, ignore_eos=True))
            call = stub.Generate(long, timeout=60)
            next(call)  # the one slot is taken
            with pytest.raises(grpc.RpcError) as info:
                generate(stub, "tiny-llama", "second")
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry later" in info.value.details()
            call.cancel()
            for _ in range(50):  # the server notices the cancellation asynchronously
                try:
                    assert len(generate(stub, "tiny-llama", "third")) > 0
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    time.sleep(0.1)
            else:
                pytest.fail("the cancelled request's table slot was never freed")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_javascript_client_works_from_the_proto_alone(server, stub, tiny_dir):
    client = Path(__file__).parent / "node_client"
    assert (client / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "run `npm ci --prefix tests/node_client` (.ci/run does)"
    out = subprocess.run(["node", str(client / "client.js"), server, "tiny-mistral", "12", "Hello from node"],
                         check=True, capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout)
    engine = LLMEngine(tiny_dir / "tiny-mistral", EngineConfig(dtype="float32"))
    expected = engine.generate(["Hello from node"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert result["token_ids"] == expected.output_token_ids
    assert result["finish_reason"] == "FINISH_REASON_LENGTH"
    assert result["usage"]["completion_tokens"] == 12
    assert result["text"] == engine.tokenizer.decode(expected.output_token_ids)


def test_status_shows_the_request_in_flight(stub, capsys):
    from tokenpool.cli.main import main

    call = stub.Generate(pb.GenerateRequest(model="tiny-llama", text="status", request_id="status-probe",
                                            sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True)),
                         timeout=60)
    next(call)
    assert main(["status", "--requests"]) == 0
    call.cancel()
    out = capsys.readouterr().out
    assert re.search(r"serve-\d+: \d+/1024 slots in use", out), out
    assert "status-probe" in out and "tiny-llama" in out
