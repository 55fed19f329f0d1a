"""Distributed traces across the stack: an OTLP gRPC receiver in this process (opentelemetry-proto's
TraceService on 127.0.0.1), the stack started with tracing pointed at it, requests for two models,
and one trace per request with correctly parented spans from the proxy, the prefill instance, the
kvtransfer agent and the decode instance, with model-switch spans where switches happened."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from tokenpool.compose.launcher import Stack, StackConfig
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc
from tokenpool.telemetry import tracing

MODELS = ("tiny-llama", "tiny-qwen2")
MAX_TOKENS = 6
SPAN_WAIT_S = 30.0
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
ROOT = "tokenpool.v1.Inference/Generate"


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict
    start_ns: int
    end_ns: int
    error: bool


def _value(any_value):
    return getattr(any_value, any_value.WhichOneof("value"))


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    received.append(Span(resource["service.name"], s.trace_id.hex(), s.span_id.hex(),
                                         s.parent_span_id.hex(), s.name,
                                         {a.key: _value(a.value) for a in s.attributes},
                                         s.start_time_unix_nano, s.end_time_unix_nano,
                                         s.status.code == s.status.STATUS_CODE_ERROR))
        with self.lock:
            self.spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    receiver = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    yield receiver
    server.stop(None)


@pytest.fixture(scope="module")
def stack(receiver, tiny_dir, tmp_path_factory):
    config = StackConfig(models={m: tiny_dir / m for m in MODELS}, prefill=1, decode=1, port=0,
                         dtype="float32", kv_mib=8, host_kv_mib=32, pool_mib=32, threads=1,
                         trace_endpoint=receiver.endpoint)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export within 0.2 s, not the default 5 s
        env.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        stack = Stack(config, tmp_path_factory.mktemp("trace-logs"))
        stack.start(progress=lambda line: None)
    yield stack
    codes = stack.stop()
    assert all(code == 0 for _, code in codes), codes


def generate(stub, request_id: str, model: str, metadata=()):
    request = pb.GenerateRequest(model=model, text=f"Tell me about {request_id}", request_id=request_id,
                                 sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    return list(stub.Generate(request, timeout=120, metadata=metadata))


def traces_of(receiver: Receiver, request_ids: list[str]) -> tuple[dict[str, list[Span]], list[Span]]:
    """Wait (bounded) until each request's trace is complete: its root ended and its last decode
    turn, kv publish and agent spans arrived -> ({request id: spans of its trace}, all spans)."""
    deadline = time.monotonic() + SPAN_WAIT_S
    while True:
        spans = receiver.snapshot()
        roots = {s.attributes.get("request_id"): s for s in spans
                 if s.name == "tokenpool.v1.Inference/Generate" and s.service == "proxy"}
        by_trace = defaultdict(list)
        for s in spans:
            by_trace[s.trace_id].append(s)
        traces = {r: by_trace[roots[r].trace_id] for r in request_ids if r in roots}
        needed = {"decode.turn", "kv.publish", "tokenpool.internal.v1.KVTransfer/Release"}
        if len(traces) == len(request_ids) and all(needed <= {s.name for s in t} for t in traces.values()):
            return traces, spans
        if time.monotonic() > deadline:
            pytest.fail(f"traces incomplete after {SPAN_WAIT_S} s: {len(traces)} of {len(request_ids)} "
                        f"requests have a root; names: {sorted({s.name for s in spans})}")
        time.sleep(0.2)


def one(spans: list[Span], name: str, service: str | None = None) -> Span:
    found = [s for s in spans if s.name == name and (service is None or s.service == service)]
    assert len(found) == 1, (name, service, found)
    return found[0]


def test_one_trace_per_request_with_every_service_parented_and_switches(stack, receiver):
    ids = [f"traced-{i}" for i in range(6)]
    with grpc.insecure_channel(stack.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with futures.ThreadPoolExecutor(len(ids)) as pool:
            results = list(pool.map(lambda i: generate(stub, ids[i], MODELS[i % 2]), range(len(ids))))
        client = ("traceparent", f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01")
        results.append(generate(stub, "client-traced", MODELS[0], metadata=[client]))
        with pytest.raises(grpc.RpcError) as refused:
            generate(stub, "refused", "no-such-model")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert all(len([t for r in rs for t in r.token_ids]) == MAX_TOKENS for rs in results)
    traces, spans = traces_of(receiver, [*ids, "client-traced"])

    assert len({t[0].trace_id for t in traces.values()}) == len(traces), "a trace per request"
    deadline = time.monotonic() + SPAN_WAIT_S
    while not (refused_roots := [s for s in spans if s.name == ROOT and s.error]):
        assert time.monotonic() < deadline, "the refused request's span never arrived"
        time.sleep(0.2)
        spans = receiver.snapshot()
    assert len(refused_roots) == 1 and refused_roots[0].attributes["rpc.grpc.status_code"] == 5  # NOT_FOUND
    assert [s for s in spans if s.trace_id == refused_roots[0].trace_id] == refused_roots, "no children"
    request_traces = {t[0].trace_id for t in traces.values()} | {refused_roots[0].trace_id}
    stray = {s.trace_id for s in spans} - request_traces
    assert not stray, f"spans outside any request's trace: {[s.name for s in spans if s.trace_id in stray]}"
    for request_id, trace in traces.items():
        check_trace(request_id, trace)
    client_root = one(traces["client-traced"], "tokenpool.v1.Inference/Generate")
    assert client_root.trace_id == CLIENT_TRACE_ID and client_root.parent_id == CLIENT_SPAN_ID

    switches = [s for s in spans if s.name == "model.switch"]
    assert switches, "two models alternating on one prefill and one decode instance must switch"
    for s in switches:
        assert s.attributes["weight_bytes"] > 0 and s.attributes["seconds"] > 0, s
        assert s.attributes["model"] in MODELS and s.end_ns >= s.start_ns
    assert {s.service for s in switches} == {"prefill-0", "decode-0"}


def check_trace(request_id: str, trace: list[Span]) -> None:
    ids = {s.span_id: s for s in trace}
    assert len(ids) == len(trace)
    assert {"proxy", "prefill-0", "kvtransfer-0", "decode-0"} <= {s.service for s in trace}, request_id
    root = one(trace, "tokenpool.v1.Inference/Generate", "proxy")
    assert root.attributes["outcome"] == "finished" and root.attributes["model"] in MODELS
    for s in trace:
        if s is not root:
            assert s.parent_id in ids, f"{request_id}: {s.service} {s.name} has no parent in its trace"
            parent = ids[s.parent_id]
            assert parent.start_ns <= s.start_ns + 1_000_000, f"{s.name} starts before its parent"

    def parent(span: Span) -> Span:
        return ids[span.parent_id]
    prefill_call, decode_call = one(trace, "proxy.prefill", "proxy"), one(trace, "proxy.decode", "proxy")
    assert parent(prefill_call) is root and parent(decode_call) is root
    prefill = one(trace, "tokenpool.internal.v1.Prefill/Prefill", "prefill-0")
    assert parent(prefill) is prefill_call
    for name in ("prefill.queue", "prefill.compute", "kv.publish"):
        assert parent(one(trace, name, "prefill-0")) is prefill, name
    publish = one(trace, "kv.publish", "prefill-0")
    assert publish.attributes["kv_bytes"] > 0 and publish.attributes["kv_path"] == "node-local"
    for name in ("Allocate", "MarkReady"):
        assert parent(one(trace, f"tokenpool.internal.v1.KVTransfer/{name}", "kvtransfer-0")) is publish
    decode = one(trace, "tokenpool.internal.v1.Decode/Decode", "decode-0")
    assert parent(decode) is decode_call
    admission = one(trace, "decode.admission", "decode-0")
    assert parent(admission) is decode
    assert parent(one(trace, "tokenpool.internal.v1.KVTransfer/Release", "kvtransfer-0")) is admission
    turns = [s for s in trace if s.name == "decode.turn"]
    assert turns and all(parent(t) is decode for t in turns)
    assert sum(t.attributes["tokens"] for t in turns) == MAX_TOKENS - 1, "the first token came from prefill"
    for switch in (s for s in trace if s.name == "model.switch"):
        assert parent(switch).name in ("decode.turn", "prefill.compute")


def test_tracing_off_installs_nothing():
    """Without OTEL_* settings a service process loads no SDK, sets no provider, adds no interceptor."""
    code = """
import sys
from opentelemetry import trace
from tokenpool.telemetry import tracing
from tokenpool.telemetry.grpc_tracing import server_interceptors
import tokenpool.proxy.fleet_backend, tokenpool.prefill_svc.prefill_servicer
import tokenpool.decode_svc.decode_servicer, tokenpool.kvtransfer.agent
assert tracing.configure("proxy") is False
assert not tracing.enabled() and tracing.capture() is None and server_interceptors(True) == []
assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider", trace.get_tracer_provider()
loaded = [m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))]
assert not loaded, loaded
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("env, wanted", [
    ({}, None),
    ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, "otlp"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"}, None),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
])
def test_the_otel_variables_decide_whether_tracing_is_on(env, wanted):
    assert tracing.wanted(env) == wanted


@pytest.mark.parametrize("env, needle", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
     "'http/protobuf'"),
])
def test_settings_tracing_cannot_serve_are_refused_by_name(env, needle):
    with pytest.raises(ValueError, match=needle):
        tracing.wanted(env)
