"""A server of tokenpool.v1.Inference that stops (SIGTERM, or a proxy fenced by its table) ends the
streams still running at the end of its grace with UNAVAILABLE and the reason, not a cut-off
stream; a stream that ends within the grace is untouched; each request's row is freed and its
backend work cancelled."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from tokenpool.cli.service_process import start_grpc_server
from tokenpool.engine.request_book import RequestOutput
from tokenpool.engine.sequence import FinishReason
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc
from tokenpool.proxy import stop_serving as stopping
from tokenpool.proxy.backend import Backend
from tokenpool.proxy.inference_servicer import InferenceServicer
from tokenpool.proxy.request_table import make_request_table
from tokenpool.proxy.served_model import served_model_from_folder

GRACE_S = 3.0  # the quick stream has 1.8 s (grace less END_BEFORE_S, less 0.2 s) to end: a slow CI too
REASON = "the proxy is stopping"


class HeldBackend(Backend):
    """Streams that send one token and then nothing, except for prompts of the model "quick", which
    finish once release() is called."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.quick: list = []

    async def submit(self, sub) -> None:
        sub.loop = asyncio.get_running_loop()
        sub.deliver(_output(sub.request_id, finished=False))
        if sub.sampling.max_tokens == 2:
            self.quick.append(sub)

    def release(self) -> None:
        for sub in self.quick:
            sub.deliver(_output(sub.request_id, finished=True))
            sub.deliver(None)

    def cancel(self, sub) -> None:
        self.cancelled.append(sub.request_id)

    async def close(self) -> None:
        pass


def _output(request_id: str, finished: bool) -> RequestOutput:
    return RequestOutput(request_id, [5], "x", finished, FinishReason.LENGTH if finished else None,
                         num_prompt_tokens=3, num_output_tokens=2 if finished else 1)


async def _rest(call) -> list:
    """What is left of a stream read with call.read() (the iterator would not mix with it)."""
    rest = []
    while (response := await call.read()) is not grpc.aio.EOF:
        rest.append(response)
    return rest


@pytest.fixture
def served(tiny_dir):
    return {"tiny-llama": served_model_from_folder("tiny-llama", tiny_dir / "tiny-llama", "float32")}


def test_streams_running_past_the_grace_end_unavailable_with_the_reason(served, monkeypatch):
    monkeypatch.setattr(stopping, "STOP_GRACE_S", GRACE_S)
    table = make_request_table("shm", name=f"stop-test-{os.getpid()}", capacity=8, create=True)
    backend = HeldBackend()
    servicer = InferenceServicer(backend, served, table)

    async def scenario():
        server = await start_grpc_server("127.0.0.1:0", [(inference_pb2_grpc.add_InferenceServicer_to_server,
                                                           servicer)], ["tokenpool.v1.Inference"])
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            held = [stub.Generate(pb.GenerateRequest(model="tiny-llama", text=f"held {i}",
                                                     sampling=pb.SamplingParams(max_tokens=64)))
                    for i in range(3)]
            quick = stub.Generate(pb.GenerateRequest(model="tiny-llama", text="quick",
                                                     sampling=pb.SamplingParams(max_tokens=2)))
            for call in (*held, quick):
                await call.read()  # the first token: every stream is in flight
            stop = asyncio.ensure_future(stopping.stop_serving(server, servicer, 0.0, REASON))
            await asyncio.sleep(0.2)
            backend.release()  # ends within the grace: completes as usual
            quick_rest = await _rest(quick)
            outcomes = []
            for call in held:
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await _rest(call)
                outcomes.append((ended.value.code(), ended.value.details()))
            await stop
            return quick_rest, await quick.code(), outcomes

    try:
        quick_rest, quick_code, outcomes = asyncio.run(scenario())
        assert quick_code == grpc.StatusCode.OK and quick_rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        for code, details in outcomes:
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            assert REASON in details and "retry" in details, details
        assert len(backend.cancelled) == 3  # the ended streams' work is cancelled, the quick one's is not
        servicer.close()
        assert table.usage().used == 0  # every row freed
    finally:
        table.close()
        table.unlink()
