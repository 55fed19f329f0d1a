"""The HTTP gateway follows the proxy's catalogue without a restart: a model added at run time through
the admin API is listed and served by the official `openai` client (the same greedy text as the gRPC
stream), gets its Prometheus series, and once removed is a 404 in OpenAI's shape that no longer names
it; the public Tokenize / Detokenize RPCs the gateway relies on check what they are given; and the
gateway's ModelCatalogue (with a fake proxy) coalesces the listings that unknown ids ask for. The
stack's public API takes a bearer token, so the gateway reads the catalogue with its own."""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import openai
import pytest
from gateway_helpers import get, post
from prometheus_client import CollectorRegistry, generate_latest
from stack_helpers import start_tiny_stack, wait_until_idle
from tokenpool.gateway.catalogue import ModelCatalogue
from tokenpool.gateway.errors import APIError
from tokenpool.gateway.metrics import GatewayMetrics
from tokenpool.protos.v1 import admin_pb2 as apb
from tokenpool.protos.v1 import admin_pb2_grpc, inference_pb2_grpc
from tokenpool.protos.v1 import inference_pb2 as pb
from waiting import wait_for

SERVED = "tiny-qwen2"
OTHER = "tiny-qwen3"  # a third model to take an arena slot from the added one when it is removed
ADDED = "added-qwen2"  # the same shape as SERVED (fits its arena slots, nothing to profile)
CONTENT = "The quick brown fox"
NEW_TOKENS = 8
MESSAGES = [{"role": "user", "content": CONTENT}]
WAIT_S = 30.0  # an upper bound for waits on a condition, never a sleep


PUBLIC_TOKEN = "gateway-catalogue-public"
PUBLIC_AUTH = [("authorization", f"Bearer {PUBLIC_TOKEN}")]
HTTP_AUTH = {"Authorization": f"Bearer {PUBLIC_TOKEN}"}


def _secret(folder, name: str, value: str):
    path = folder / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return _secret(tmp_path_factory.mktemp("admin"), "admin-token", "gateway-catalogue-secret")


@pytest.fixture(scope="module")
def stack(tiny_dir, token_file, tmp_path_factory):
    public = _secret(tmp_path_factory.mktemp("public"), "token", PUBLIC_TOKEN)
    stack = start_tiny_stack(tiny_dir, (SERVED, OTHER), tmp_path_factory.mktemp("gateway-catalogue-logs"),
                             prefill=1, decode=1, gateway=True, gateway_port=0, admin_token_file=token_file,
                             auth_token_file=public)
    yield stack
    codes = stack.stop()
    assert codes and all(code == 0 for _, code in codes), codes


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.gateway_url, api_key=PUBLIC_TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.address) as channel:
        yield channel


def test_a_model_added_at_run_time_is_served_then_removed_is_404(stack, client, channel, tiny_dir,
                                                                 token_file):
    stub, admin = inference_pb2_grpc.InferenceStub(channel), admin_pb2_grpc.AdminStub(channel)
    auth = [("authorization", f"Bearer {token_file.read_text().strip()}")]
    assert sorted(m.id for m in client.models.list().data) == [SERVED, OTHER]
    _assert_not_found(client, ADDED)
    assert get(stack, "/v1/models").status == 401  # the gateway's token is not the clients' pass

    admin.AddModel(apb.AddModelRequest(id=ADDED, folder=str(tiny_dir / SERVED)), metadata=auth, timeout=120)
    # at once, before any listing: an id the gateway has not seen makes it read the catalogue
    reply = client.chat.completions.create(model=ADDED, messages=MESSAGES, max_tokens=NEW_TOKENS,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert reply.model == ADDED and reply.choices[0].message.content == _grpc_chat_text(stub, ADDED)
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(cards) == {SERVED, OTHER, ADDED}
    assert cards[ADDED]["state"] in ("resident", "host", "disk") and cards[ADDED]["max_model_len"] > 0
    metrics = get(stack, "/metrics").text  # exempt from the token, as /health
    relayed = rf'^vllm:generation_tokens_total{{model_name="{ADDED}"}} {NEW_TOKENS}\.0$'
    assert re.search(relayed, metrics, re.M), metrics
    assert re.search(rf'^vllm:kv_cache_usage_perc{{model_name="{ADDED}"}} ', metrics, re.M)

    _remove_once_idle(admin, auth, ADDED)
    error = _assert_not_found(client, ADDED)  # at once: the proxy's NOT_FOUND, however fresh the listing
    assert ADDED not in error["message"].partition("models: ")[2], error
    assert sorted(m.id for m in client.models.list().data) == [SERVED, OTHER]
    wait_for(lambda: f'model_name="{ADDED}"' not in get(stack, "/metrics").text,  # its series go
             timeout_s=WAIT_S)
    wait_until_idle(stack)


def test_tokenize_and_detokenize_check_what_they_are_given(stack, channel):
    stub = inference_pb2_grpc.InferenceStub(channel)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=CONTENT)])
    templated = stub.Tokenize(pb.TokenizeRequest(model=SERVED, chat=chat), metadata=PUBLIC_AUTH, timeout=30)
    http = post(stack, "/tokenize", {"model": SERVED, "messages": MESSAGES}, HTTP_AUTH).json()
    assert http["tokens"] == list(templated.ids) and http["max_model_len"] == templated.max_context > 0
    plain = stub.Tokenize(pb.TokenizeRequest(model=SERVED, text=CONTENT), metadata=PUBLIC_AUTH, timeout=30)
    asked = pb.DetokenizeRequest(model=SERVED, ids=plain.ids)
    back = stub.Detokenize(asked, metadata=PUBLIC_AUTH, timeout=30)
    assert back.text == CONTENT
    bad = [(pb.TokenizeRequest(model="no-such-model", text="x"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
           (pb.TokenizeRequest(model=SERVED, chat=pb.ChatMessages()), grpc.StatusCode.INVALID_ARGUMENT,
            "chat.messages"),
           (pb.DetokenizeRequest(model=SERVED, ids=[1 << 30]), grpc.StatusCode.INVALID_ARGUMENT, "ids"),
           (pb.DetokenizeRequest(model=SERVED, ids=[1] * ((1 << 18) + 1)), grpc.StatusCode.INVALID_ARGUMENT,
            "ids")]
    for request, code, named in bad:
        call = stub.Tokenize if isinstance(request, pb.TokenizeRequest) else stub.Detokenize
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=PUBLIC_AUTH, timeout=30)
        assert info.value.code() == code and named in info.value.details(), info.value.details()
    reply = post(stack, "/detokenize", {"model": SERVED, "tokens": [1 << 30]}, HTTP_AUTH)
    assert reply.status == 400 and reply.json()["error"]["param"] == "tokens", reply.text


class FakeProxy:
    """ListModels of a settable id list; each call waits for `gate` (when set) and is counted."""

    def __init__(self, ids) -> None:
        self.ids, self.calls, self.gate = list(ids), 0, None

    async def list_models(self, metadata=()):
        self.calls += 1
        ids = list(self.ids)  # what the proxy had when the call reached it
        if self.gate is not None:
            await self.gate.wait()
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=i) for i in ids])


def _catalogue(ids) -> tuple[ModelCatalogue, FakeProxy, CollectorRegistry]:
    proxy, registry = FakeProxy(ids), CollectorRegistry()
    return ModelCatalogue(proxy, GatewayMetrics(registry)), proxy, registry


def test_unknown_ids_wait_for_one_listing_that_started_after_them():
    async def run():
        catalogue, proxy, _ = _catalogue(["a"])
        proxy.gate = asyncio.Event()
        older = asyncio.create_task(catalogue.refresh(()))  # in flight before "b" exists
        await asyncio.sleep(0.01)
        proxy.ids.append("b")
        waiters = [asyncio.create_task(catalogue.require("b", ())) for _ in range(20)]
        await asyncio.sleep(0.01)
        proxy.gate.set()
        found = await asyncio.gather(*waiters)
        await older
        assert {m.id for m in found} == {"b"}
        assert proxy.calls == 2, "the older call, and one call for all 20 waiters"
        with pytest.raises(APIError) as info:
            await catalogue.require("no-such-model", ())
        assert info.value.status == 404 and info.value.message.endswith("models: a, b")
        assert proxy.calls == 3

    asyncio.run(run())


def test_series_follow_the_catalogue_and_outlive_a_removed_models_last_request():
    catalogue, _, registry = _catalogue(["a"])

    def series() -> set[str]:
        return set(re.findall(r'model_name="([^"]+)"', generate_latest(registry).decode()))

    catalogue.update([pb.ModelInfo(id="a"), pb.ModelInfo(id="b", kv_cache_usage=0.5)])
    assert series() == {"a", "b"}
    timer = catalogue.metrics.started("b")
    catalogue.forget("b")  # the proxy said NOT_FOUND while b's request was live
    assert "b" in series()
    timer.ended("stop")
    catalogue.update([pb.ModelInfo(id="a")])
    assert series() == {"a"}


# -- helpers ---------------------------------------------------------------------------------------

def _grpc_chat_text(stub, model: str) -> str:
    request = pb.GenerateRequest(model=model, text=CONTENT, chat=True, sampling=pb.SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    return "".join(r.text for r in stub.Generate(request, metadata=PUBLIC_AUTH, timeout=120))


def _assert_not_found(client, model: str) -> dict:
    """The gateway's 404 for a chat request naming model, in OpenAI's error shape."""
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    error = info.value.body if "message" in info.value.body else info.value.body["error"]
    assert info.value.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def _remove_once_idle(admin, auth, model: str) -> None:
    """RemoveModel, asked again while the proxy still counts a just-ended stream (it refuses with
    FAILED_PRECONDITION naming the requests in flight; a user retries as the refusal says)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            admin.RemoveModel(apb.ModelRef(id=model), metadata=auth, timeout=60)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


