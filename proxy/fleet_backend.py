"""FleetBackend: a request's life across the disaggregated fleet, driven from the proxy.

    Prefill(prompt) on a prefill instance  ->  first token + KV handle  ->  first output
    Decode(handle) on a decode instance    ->  chunks of tokens         ->  outputs ... last

Which instances is the Dispatcher's choice. Cancellation (client gone, deadline) cancels
the RPC in progress, and the instances free the KV: a prefill instance drops the prompt or
releases what it published; a handle between the two calls is released here; a decode
instance aborts the sequence (the explicit Cancel RPC backs up the stream's cancellation).
An instance's error ends the request with that instance's status and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import grpc
from tokenpool.engine.request_book import RequestOutput
from tokenpool.protos.convert import FINISH_FROM_PB, sampling_to_pb
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.telemetry import tracing
from tokenpool.telemetry.grpc_tracing import aio_channel

from .backend import Backend, BackendFullError, Submission
from .dispatcher import Dispatcher, InstanceLoad, Timing
from .inference_servicer import RequestError

CLEANUP_TIMEOUT_S = 5.0


@dataclass
class Instance:
    """One prefill or decode instance as the proxy sees it."""

    name: str
    address: str
    channel: grpc.aio.Channel
    stub: object
    load: InstanceLoad = field(default_factory=InstanceLoad)


class FleetBackend(Backend):
    def __init__(self, prefill: dict[str, str], decode: dict[str, str], kvtransfer: str,
                 dispatcher: Dispatcher, max_in_flight: int = 1024) -> None:
        """prefill, decode: instance name -> address; kvtransfer: the node's agent. Call in a running
        event loop (grpc.aio channels bind to it)."""
        if not prefill or not decode:
            raise ValueError(f"a fleet needs prefill and decode instances, got {len(prefill)} prefill "
                             f"and {len(decode)} decode")
        self.prefill = [_connect(n, a, instances_pb2_grpc.PrefillStub) for n, a in prefill.items()]
        self.decode = [_connect(n, a, instances_pb2_grpc.DecodeStub) for n, a in decode.items()]
        self._agent_channel = aio_channel(kvtransfer)
        self.agent = instances_pb2_grpc.KVTransferStub(self._agent_channel)
        self.dispatcher = dispatcher
        self._timings_tried = False
        self.max_in_flight = max_in_flight
        self._tasks: dict[str, asyncio.Task] = {}

    async def submit(self, sub: Submission) -> None:
        if len(self._tasks) >= self.max_in_flight:
            raise BackendFullError(f"{len(self._tasks)} requests in flight, "
                                   f"the limit is {self.max_in_flight}")
        sub.loop = asyncio.get_running_loop()
        deadline = time.monotonic() + sub.timeout_s if sub.timeout_s is not None else None
        task = asyncio.create_task(self._run(sub, deadline), name=f"request-{sub.request_id}")
        self._tasks[sub.request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(sub.request_id, None))

    def cancel(self, sub: Submission) -> None:
        task = self._tasks.get(sub.request_id)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for channel in [i.channel for i in self.prefill + self.decode] + [self._agent_channel]:
            await channel.close()

    async def statuses(self) -> list[ipb.InstanceStatus]:
        """Every instance's Status (an unreachable one reports only its name and role)."""
        async def one(instance: Instance, role: str) -> ipb.InstanceStatus:
            try:
                return await instance.stub.Status(ipb.StatusRequest(), timeout=CLEANUP_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                return ipb.InstanceStatus(name=instance.name, role=f"{role} (unreachable)")
        return list(await asyncio.gather(*[one(i, "prefill") for i in self.prefill],
                                         *[one(i, "decode") for i in self.decode]))

    async def _run(self, sub: Submission, deadline: float | None) -> None:
        decoding: list[Instance] = []  # the decode instance, once the Decode call has started
        try:
            await self._learn_timings()
            async with self.dispatcher.decode_slot(sub.model, self.decode) as decode:
                prefilled = await self._prefill(sub, deadline)
                sub.deliver(self._first_output(sub, prefilled))
                if prefilled.finish_reason == 0:
                    await self._decode(sub, decode, prefilled, deadline, decoding)
            sub.deliver(None)
        except grpc.aio.AioRpcError as exc:
            await self._clean_up(sub, decoding)
            sub.deliver(RequestError(exc.code(), exc.details() or str(exc.code())))
        except asyncio.CancelledError:
            await self._clean_up(sub, decoding)
            raise

    async def _prefill(self, sub: Submission, deadline: float | None) -> ipb.PrefillResponse:
        instance = self.dispatcher.pick_prefill(sub.request_id, sub.model, len(sub.prompt), self.prefill)
        request = ipb.PrefillRequest(request_id=sub.request_id, model=sub.model, prompt_token_ids=sub.prompt,
                                     sampling=sampling_to_pb(sub.sampling),
                                     timeout_seconds=_left(deadline) or 0.0)
        if sub.table_slot is not None:
            request.table_slot = sub.table_slot
        try:
            with instance.load.hold(sub.model), tracing.span("proxy.prefill", instance=instance.name):
                return await instance.stub.Prefill(request, timeout=_left(deadline))
        finally:
            self.dispatcher.prefill_done(sub.request_id)

    async def _decode(self, sub: Submission, instance: Instance, prefilled: ipb.PrefillResponse,
                      deadline: float | None, decoding: list[Instance]) -> None:
        request = ipb.DecodeRequest(
            request_id=sub.request_id, model=sub.model, prompt_token_ids=sub.prompt,
            first_token_id=prefilled.first_token_id, sampling=sampling_to_pb(sub.sampling),
            seed=prefilled.seed, kv=prefilled.kv, timeout_seconds=_left(deadline) or 0.0)
        if sub.table_slot is not None:
            request.table_slot = sub.table_slot
        decoding.append(instance)
        with tracing.span("proxy.decode", instance=instance.name):
            async for chunk in instance.stub.Decode(request, timeout=_left(deadline)):
                sub.deliver(self._output(sub, chunk))

    async def _learn_timings(self) -> None:
        """Once: the models' prefill and switch times as a prefill instance profiled them."""
        if self.dispatcher.timings or self._timings_tried:
            return
        self._timings_tried = True
        with contextlib.suppress(grpc.aio.AioRpcError):
            status = await self.prefill[0].stub.Status(ipb.StatusRequest(), timeout=CLEANUP_TIMEOUT_S)
            self.dispatcher.timings.update({t.model: Timing(t.prefill_a, t.prefill_b, t.switch_s)
                                            for t in status.timings})

    async def _clean_up(self, sub: Submission, decoding: list[Instance]) -> None:
        """After a cancellation or a failed call, free the request's KV wherever it may be: the
        hand-off pool (a handle published but never adopted, whatever the race) and the decode
        instance. Shielded from the cancellation that got us here; best-effort."""
        async def clean() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.agent.ReleaseAll(ipb.RequestRef(request_id=sub.request_id),
                                            timeout=CLEANUP_TIMEOUT_S)
            for instance in decoding:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await instance.stub.Cancel(ipb.CancelRequest(request_id=sub.request_id),
                                               timeout=CLEANUP_TIMEOUT_S)
        await asyncio.shield(clean())

    @staticmethod
    def _first_output(sub: Submission, prefilled: ipb.PrefillResponse) -> RequestOutput:
        reason = FINISH_FROM_PB.get(prefilled.finish_reason)
        return RequestOutput(sub.request_id, [prefilled.first_token_id], prefilled.first_text,
                             reason is not None, reason, len(sub.prompt), 1)

    @staticmethod
    def _output(sub: Submission, chunk: ipb.DecodeChunk) -> RequestOutput:
        reason = FINISH_FROM_PB.get(chunk.finish_reason)
        return RequestOutput(sub.request_id, list(chunk.token_ids), chunk.text, reason is not None, reason,
                             len(sub.prompt), chunk.num_output_tokens)


def _connect(name: str, address: str, stub_class) -> Instance:
    channel = aio_channel(address)
    return Instance(name, address, channel, stub_class(channel))


def _left(deadline: float | None) -> float | None:
    """Seconds to the deadline (at least a millisecond, so a passed one fails the call at once)."""
    return None if deadline is None else max(deadline - time.monotonic(), 1e-3)

