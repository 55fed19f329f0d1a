"""Hostile input against a running stack (agent, prefill, decode, proxy as separate processes):
a pickle payload that would write a marker file if anything unpickled it, sent to every port
and into the KV descriptor path; bounded fuzzing of the public API with random and mutated
messages. Every service must stay up, every answer must be a proper status, nothing may leak."""

from __future__ import annotations

import os
import pickle
import random
import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stack_helpers import service, start_tiny_stack, wait_until_idle
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc

MODELS = ("tiny-llama", "tiny-qwen2")
FUZZ_CASES = 150
MUTATED_CASES = 150
# What a front door may answer to a malformed or hostile request; UNKNOWN (an unhandled
# exception in a servicer) and UNAVAILABLE (a crashed service) are never acceptable.
PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
          grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED,
          grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.ALREADY_EXISTS}


class _Marker:
    """Unpickling this runs `touch path`; nothing in tokenpool may ever do that."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture(scope="module")
def stack(tiny_dir, tmp_path_factory):
    stack = start_tiny_stack(tiny_dir, MODELS, tmp_path_factory.mktemp("hostile-logs"), prefill=1, decode=1,
                             host_kv_mib=16, pool_mib=16, table_slots=16)
    yield stack
    codes = stack.stop()
    assert codes and all(code == 0 for _, code in codes), codes


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.address) as channel:
        yield channel


def listening_ports(stack) -> list[tuple[str, str]]:
    """(service name, host:port) for every port the stack listens on (gRPC, and metrics if any)."""
    ports = [(s.name, s.address) for s in stack.services]
    for s in stack.services:
        metrics = s.info.get("metrics")
        if metrics:
            ports.append((f"{s.name} metrics", str(metrics).removeprefix("http://").split("/")[0]))
    return ports


def all_methods():
    """(full method path, is server-streaming) of every service the stack exposes."""
    for descriptor in (pb.DESCRIPTOR, ipb.DESCRIPTOR):
        for svc in descriptor.services_by_name.values():
            for method in svc.methods:
                yield f"/{svc.full_name}/{method.name}", method.server_streaming


def assert_all_serving(stack):
    assert not stack.dead(), [s.name for s in stack.dead()]
    for s in stack.services:
        with grpc.insecure_channel(s.address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, s.name


def assert_still_generates(channel):
    request = pb.GenerateRequest(model=MODELS[0], text="still here?",
                                 sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True))
    responses = list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))
    assert sum(len(r.token_ids) for r in responses) == 4


def call_raw(channel, method: str, streaming: bool, payload: bytes, timeout: float = 10):
    """Send payload as the request body of method, unparsed -> the status code it ends with."""
    kind = channel.unary_stream if streaming else channel.unary_unary
    call = kind(method, request_serializer=None, response_deserializer=None)
    try:
        result = call(payload, timeout=timeout)
        if streaming:
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_pickle_payload_on_every_port_and_in_the_kv_path_is_never_unpickled(stack, channel, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)))
    assert b"system" in payload  # it really is a code-carrying pickle
    text = payload.decode("latin-1")  # as a protobuf string field
    for _, address in listening_ports(stack):
        host, _, port = address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as raw:  # not even HTTP/2
            raw.sendall(payload)
            raw.settimeout(2)
            try:
                raw.recv(4096)
            except (TimeoutError, ConnectionError):
                pass
    for name, address in [(s.name, s.address) for s in stack.services]:
        with grpc.insecure_channel(address) as ch:
            for method, streaming in all_methods():
                code = call_raw(ch, method, streaming, payload)
                assert code in PROPER, (name, method, code)
    # Inside well-formed messages: as a prompt, an id, and as the KV handle a decode instance is
    # told to adopt (ids, dtype and offsets a peer could forge).
    stub = inference_pb2_grpc.InferenceStub(channel)
    for fields in ({"model": MODELS[0], "text": text}, {"model": text, "text": "hi"},
                   {"model": MODELS[0], "text": "hi", "request_id": text[:60]}):
        request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=2), **fields)
        try:
            list(stub.Generate(request, timeout=60))
        except grpc.RpcError as exc:
            assert exc.code() in PROPER, exc
    decode = service(stack, "decode-0")
    forged = ipb.KVHandle(handle_id=text, block_offsets=[2**63, 0, 12345], block_dims=[2, 2, 16, 2, 16],
                          dtype=text, num_tokens=5, ready=True)
    with grpc.insecure_channel(decode.address) as ch:
        request = ipb.DecodeRequest(request_id="forged", model=MODELS[0], prompt_token_ids=[1, 2, 3, 4, 5],
                                    first_token_id=6, sampling=pb.SamplingParams(max_tokens=3), kv=forged)
        with pytest.raises(grpc.RpcError) as info:
            list(instances_pb2_grpc.DecodeStub(ch).Decode(request, timeout=30))
        assert info.value.code() in PROPER - {grpc.StatusCode.OK}, info.value
    agent = service(stack, "kvtransfer-0")
    with grpc.insecure_channel(agent.address) as ch:
        kv = instances_pb2_grpc.KVTransferStub(ch)
        for call in (kv.MarkReady, kv.Release):
            with pytest.raises(grpc.RpcError) as info:
                call(forged, timeout=10)
            assert info.value.code() in PROPER, info.value
        with pytest.raises(grpc.RpcError) as info:
            kv.Allocate(ipb.AllocateRequest(block_dims=[2, 2, 16, 2, 16], dtype=text, num_blocks=1),
                        timeout=10)
        assert info.value.code() in PROPER, info.value
    time.sleep(0.5)  # a (forbidden) unpickle in a background thread would have run by now
    assert not marker.exists(), "a service unpickled peer data"
    assert_all_serving(stack)
    assert_still_generates(channel)
    wait_until_idle(stack)


def test_fields_only_services_set_are_refused_when_a_client_sends_them(channel):
    """A DecodeRequest's KV handle and table slot (fields 7 and 9 there) appended to a public
    request, and a KV handle as an unknown field inside its sampling parameters."""
    kv = ipb.DecodeRequest(kv=ipb.KVHandle(handle_id="h-1", block_offsets=[0, 4096], dtype="float32"),
                           table_slot=3).SerializeToString()
    handle = ipb.KVHandle(handle_id="h-1", block_offsets=[0, 4096]).SerializeToString()
    public = pb.GenerateRequest(model=MODELS[0], text="hi", sampling=pb.SamplingParams(max_tokens=2))
    sampling = public.sampling.SerializeToString() + bytes([15 << 3 | 2, len(handle)]) + handle
    inner = pb.GenerateRequest(model=MODELS[0], text="hi").SerializeToString() + \
        bytes([5 << 3 | 2, len(sampling)]) + sampling  # field 5 (sampling), length-delimited
    for body in (public.SerializeToString() + kv, inner):
        call = channel.unary_stream("/tokenpool.v1.Inference/Generate", request_serializer=None,
                                    response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(call(body, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "are not part of" in info.value.details(), info.value.details()
    assert_still_generates(channel)


sampling_params = st.builds(
    pb.SamplingParams,
    max_tokens=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    temperature=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    top_k=st.integers(0, 2**32 - 1),
    top_p=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=4),
    stop=st.lists(st.text(max_size=8), max_size=3),
    ignore_eos=st.booleans(),
)
generate_requests = st.builds(
    pb.GenerateRequest,
    model=st.one_of(st.sampled_from(MODELS), st.text(max_size=20)),
    text=st.text(max_size=200),
    chat=st.booleans(),
    sampling=st.one_of(st.none(), sampling_params),
    request_id=st.one_of(st.just(""), st.text(max_size=80)),
)


def test_fuzzing_the_public_api_leaves_every_service_up_with_proper_statuses(stack, channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    seen = {}

    @settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(request=generate_requests, token_ids=st.one_of(st.none(), st.lists(st.integers(0, 2**32 - 1),
                                                                                   max_size=40)))
    def one(request, token_ids):
        if token_ids is not None:
            request.token_ids.ids[:] = token_ids
        if request.HasField("sampling") and request.sampling.max_tokens > 8:
            request.sampling.max_tokens = 8  # keep the valid ones short: the point is the bad ones
        try:
            for _ in stub.Generate(request, timeout=60):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        seen[code] = seen.get(code, 0) + 1
        assert code in PROPER, (request, code)

    one()
    assert seen.get(grpc.StatusCode.OK) and seen.get(grpc.StatusCode.INVALID_ARGUMENT), seen
    rng = random.Random(7)
    valid = pb.GenerateRequest(model=MODELS[1], text="mutate me", sampling=pb.SamplingParams(
        max_tokens=4, stop=["x"], seed=3)).SerializeToString()
    for _ in range(MUTATED_CASES):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            if op < 0.5 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.75:
                data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
            elif data:
                del data[rng.randrange(len(data))]
        code = call_raw(channel, "/tokenpool.v1.Inference/Generate", True, bytes(data), timeout=60)
        assert code in PROPER, (bytes(data), code)
    assert_all_serving(stack)
    assert_still_generates(channel)
    wait_until_idle(stack)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


RSS_GROWTH_BOUND = 256 << 20  # per service, across the burst


def test_a_burst_of_ten_times_the_table_is_refused_at_once_and_the_admitted_finish(stack):
    import asyncio

    slots = stack.config.table_slots
    before = {s.name: rss_bytes(s.process.pid) for s in stack.services}

    async def one(stub, i):
        request = pb.GenerateRequest(model=MODELS[i % 2], text=f"burst {i}",
                                     sampling=pb.SamplingParams(max_tokens=16, ignore_eos=True))
        start = time.monotonic()
        try:
            tokens = sum([len(r.token_ids) async for r in stub.Generate(request, timeout=120)], 0)
            return "ok", tokens, time.monotonic() - start, None
        except grpc.aio.AioRpcError as exc:
            return exc.code(), 0, time.monotonic() - start, exc.trailing_metadata()

    async def burst():
        async with grpc.aio.insecure_channel(stack.address) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            return await asyncio.gather(*(one(stub, i) for i in range(10 * slots)))

    results = asyncio.run(burst())
    admitted = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(admitted) + len(refused) == len(results), {r[0] for r in results}
    assert slots // 2 <= len(admitted) < len(results) and refused
    assert all(tokens == 16 for _, tokens, _, _ in admitted)
    assert max(seconds for _, _, seconds, _ in refused) < 2.0  # refused at once, not after queueing
    assert all(dict(meta or ()).get("retry-after-ms") for *_, meta in refused)  # a retry hint
    after = {s.name: rss_bytes(s.process.pid) for s in stack.services}
    assert all(after[n] - before[n] < RSS_GROWTH_BOUND for n in before), (before, after)
    wait_until_idle(stack)


def test_a_long_text_prompt_is_encoded_off_the_proxys_event_loop(channel):
    """A 2 MiB prompt text (the proxy's message limit is 4 MiB) takes the tokenizer seconds; the
    proxy answers other calls meanwhile: a ListModels sent after it returns before its refusal."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    text = " ".join(f"w{i % 997}" for i in range(400_000))[: 2 << 20]
    order: list[str] = []

    def long_prompt() -> None:
        with pytest.raises(grpc.RpcError) as info:
            next(stub.Generate(pb.GenerateRequest(model=MODELS[0], text=text), timeout=120))
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE  # longer than the tiny context
        order.append("long prompt refused")

    worker = threading.Thread(target=long_prompt)
    worker.start()
    time.sleep(0.05)  # lets the Generate call reach the proxy first; the test is on the order below
    stub.ListModels(pb.ListModelsRequest(), timeout=60)
    order.append("ListModels")
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert order == ["ListModels", "long prompt refused"], order


@pytest.mark.parametrize("template", [None, "{{ raise_exception('only system turns, please') }}",
                                      "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}"])
def test_a_chat_generate_the_models_template_cannot_render_is_invalid_argument(tiny_dir, tmp_path, template):
    """Generate(chat=true) encodes through the template as Tokenize's chat does: a folder without
    one, or a template that raises, is the client's INVALID_ARGUMENT, not an unhandled UNKNOWN."""
    import json
    import shutil

    from tokenpool.proxy.inference_servicer import InferenceServicer, RequestError
    from tokenpool.proxy.served_model import served_model_from_folder

    folder = shutil.copytree(tiny_dir / "tiny-llama", tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model = served_model_from_folder("m", folder)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    generate = pb.GenerateRequest(model="m", text="hi", chat=True)
    for encode, request in ((InferenceServicer._prompt_ids, generate),
                            (InferenceServicer._tokenize, pb.TokenizeRequest(model="m", chat=chat))):
        with pytest.raises(RequestError) as caught:
            encode(request, model)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "chat: m:" in str(caught.value)
    assert InferenceServicer._prompt_ids(pb.GenerateRequest(model="m", text="hi"), model)  # plain text: fine
