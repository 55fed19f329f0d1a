"""FleetBackend: a request's life across the disaggregated fleet, driven from the proxy.

    Prefill(prompt) on a prefill instance  ->  first token + KV handle  ->  first output
    Decode(handle) on a decode instance    ->  chunks of tokens         ->  outputs ... last

Which instances is the Dispatcher's choice. Cancellation (client gone, deadline) cancels
the RPC in progress, and the instances free the KV: a prefill instance drops the prompt or
releases what it published; a handle between the two calls is released here; a decode
instance aborts the sequence (the explicit Cancel RPC backs up the stream's cancellation).
An instance's error ends the request with that instance's status and message.

Instances fail. The proxy checks every instance's health every HEALTH_PROBE_S; one that
answers NOT_SERVING (draining after SIGTERM) gets no new work but keeps what it has; one
that fails LOST_AFTER probes in a row (killed, hung by SIGSTOP, partitioned) or whose call
fails UNAVAILABLE is lost: every request on it is abandoned there (its call cancelled, so a
hung instance that comes back finds its work fenced off and frees it) and dispatched again
with the prompt plus every token already streamed as the new prompt: the KV is recomputed,
the client's stream goes on with the next token, nothing lost or repeated (greedy decoding
gives exactly the undisturbed tokens). A lost instance that answers again rejoins, once
on_rejoin (the admin service's catalogue sync) has brought it in step: an instance restarted
meanwhile (Kubernetes, `tokenpool up`) starts from its flags, without the models added at run
time; one restarted so fast that no probe failed is known by the new incarnation its health
checks name (cli/incarnation.py), and is lost and rejoins the same way. After
MAX_ATTEMPTS dispatches, or with no live instance for the model, the request ends with
UNAVAILABLE in its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenpool.cli.incarnation import incarnation_of
from tokenpool.engine.request_book import RequestOutput
from tokenpool.protos.convert import FINISH_FROM_PB, logprobs_from_pb, sampling_to_pb
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.telemetry import tracing
from tokenpool.telemetry.grpc_tracing import aio_channel

from .backend import Backend, BackendFullError, Submission
from .dispatcher import Dispatcher, InstanceLoad, Timing
from .inference_servicer import RequestError
from .request_table import ATTEMPT_MARK

log = logging.getLogger(__name__)

CLEANUP_TIMEOUT_S = 5.0
HEALTH_PROBE_S = 0.5  # every instance's health is checked this often
HEALTH_TIMEOUT_S = 1.0
LOST_AFTER = 3  # failed probes in a row: the instance is lost (detected within ~2.5-4.5 s)
MAX_ATTEMPTS = 3  # dispatches of one request: the first and two after losing an instance


class InstanceLost(Exception):
    """The instance a request's call was on stopped answering (or failed UNAVAILABLE)."""


@dataclass
class Instance:
    """One prefill or decode instance as the proxy sees it."""

    name: str
    address: str
    channel: grpc.aio.Channel
    stub: object
    load: InstanceLoad = field(default_factory=InstanceLoad)
    health: object = None  # HealthStub on the same channel
    serving: bool = True  # takes new work (False: draining, or lost)
    failed_probes: int = 0
    incarnation: str = ""  # the process answering at address, as its health checks name it
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set while lost; a new one on return


class FleetBackend(Backend):
    def __init__(self, prefill: dict[str, str], decode: dict[str, str], kvtransfer: str,
                 dispatcher: Dispatcher, max_in_flight: int = 1024, nodes: dict[str, str] | None = None,
                 node_agents: dict[str, str] | None = None) -> None:
        """prefill, decode: instance name -> address; kvtransfer: the node's agent. Call in a running
        event loop (grpc.aio channels bind to it). nodes: instance name -> node, node_agents: node ->
        its kvtransfer agent (HOST:PORT); a prefill whose decode instance is on another node moves
        the KV there (NIXL). Without them every instance is on kvtransfer's node."""
        if not prefill or not decode:
            raise ValueError(f"a fleet needs prefill and decode instances, got {len(prefill)} prefill "
                             f"and {len(decode)} decode")
        self.prefill = [_connect(n, a, instances_pb2_grpc.PrefillStub) for n, a in prefill.items()]
        self.decode = [_connect(n, a, instances_pb2_grpc.DecodeStub) for n, a in decode.items()]
        self._agent_channel = aio_channel(kvtransfer)
        self.agent = instances_pb2_grpc.KVTransferStub(self._agent_channel)
        self.nodes, self.node_agents = nodes or {}, node_agents or {}
        self._other_agents = {a: aio_channel(a) for a in set(self.node_agents.values()) - {kvtransfer}}
        self.agents = [self.agent, *map(instances_pb2_grpc.KVTransferStub, self._other_agents.values())]
        self.dispatcher = dispatcher
        self._timings_tried = False
        self.max_in_flight = max_in_flight
        self._tasks: dict[str, asyncio.Task] = {}
        self._model_of: dict[str, str] = {}  # request id -> model, while its task runs
        self._cleanups: set[asyncio.Task] = set()  # abandoned attempts' clean-ups (held until done)
        # Before a lost instance that answers again takes work: bring it in step (-> whether it is).
        self.on_rejoin: Callable[[Instance], Awaitable[bool]] | None = None
        self._rejoining: dict[str, asyncio.Task] = {}
        self._monitor = asyncio.get_running_loop().create_task(self._watch_health())

    async def submit(self, sub: Submission) -> None:
        if len(self._tasks) >= self.max_in_flight:
            raise BackendFullError(f"{len(self._tasks)} requests in flight, "
                                   f"the limit is {self.max_in_flight}")
        sub.loop = asyncio.get_running_loop()
        deadline = time.monotonic() + sub.timeout_s if sub.timeout_s is not None else None
        task = asyncio.create_task(self._run(sub, deadline), name=f"request-{sub.request_id}")
        self._tasks[sub.request_id] = task
        self._model_of[sub.request_id] = sub.model
        task.add_done_callback(lambda _: (self._tasks.pop(sub.request_id, None),
                                          self._model_of.pop(sub.request_id, None)))

    def in_flight(self, model: str) -> int:
        """Requests for model submitted and not yet ended (the admin service's removal check)."""
        return sum(1 for m in self._model_of.values() if m == model)

    def cancel(self, sub: Submission) -> None:
        task = self._tasks.get(sub.request_id)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        self._monitor.cancel()
        for task in list(self._rejoining.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for channel in [i.channel for i in self.prefill + self.decode] + [self._agent_channel,
                                                                            *self._other_agents.values()]:
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
        streamed: list[int] = []  # every token delivered to the client so far, over all attempts
        seed = sub.sampling.seed
        for attempt in range(MAX_ATTEMPTS):
            attempt_id = sub.request_id if attempt == 0 else f"{sub.request_id}{ATTEMPT_MARK}{attempt}"
            decoding: list[Instance] = []  # the decode instance, once the Decode call has started
            try:
                await self._learn_timings()
                seed = await self._attempt(sub, attempt_id, streamed, seed, deadline, decoding)
                sub.deliver(None)
                return
            except InstanceLost as exc:
                log.warning("request %s: %s lost after %d tokens; dispatching again (attempt %d of %d)",
                            sub.request_id, exc, len(streamed), attempt + 2, MAX_ATTEMPTS)
                self._clean_up_later(attempt_id, decoding)
                if deadline is not None and time.monotonic() >= deadline:
                    break
            except grpc.aio.AioRpcError as exc:
                await self._clean_up(attempt_id, decoding)
                sub.deliver(RequestError(exc.code(), exc.details() or str(exc.code())))
                return
            except RequestError as exc:
                await self._clean_up(attempt_id, decoding)
                sub.deliver(exc)
                return
            except asyncio.CancelledError:
                await self._clean_up(attempt_id, decoding)
                raise
        sub.deliver(RequestError(grpc.StatusCode.UNAVAILABLE,
                                 f"request {sub.request_id}: instances lost {MAX_ATTEMPTS} times (or its "
                                 f"deadline passed) after {len(streamed)} tokens"))

    async def _attempt(self, sub: Submission, attempt_id: str, streamed: list[int], seed: int | None,
                       deadline: float | None, decoding: list[Instance]) -> int | None:
        """One dispatch: prefill of the prompt plus what was streamed, then decode. -> the seed used."""
        if streamed:  # a re-dispatch: recompute the KV of everything the client has seen, and go on
            # drawing where the lost attempt stopped (same seed, per-token draws from len(streamed))
            sampling = dataclasses.replace(sub.sampling, max_tokens=sub.sampling.max_tokens - len(streamed),
                                           seed=seed, seed_offset=len(streamed))
        else:
            sampling = sub.sampling
        prompt = sub.prompt + streamed
        async with self.dispatcher.decode_slot(sub.model, self._candidates(self.decode, sub.model)) as decode:
            prefilled = await self._prefill(sub, attempt_id, prompt, sampling, deadline, decode)
            streamed.append(prefilled.first_token_id)
            sub.deliver(self._first_output(sub, prefilled, len(streamed)))
            if prefilled.finish_reason == 0:
                await self._decode(sub, attempt_id, prompt, sampling, decode, prefilled, deadline, decoding,
                                   streamed)
        return prefilled.seed

    def _candidates(self, instances: list[Instance], model: str) -> list[Instance]:
        """Instances that may take new work; a policy that pins models gets the whole fleet (its
        pinned instance, if not serving, is treated as lost)."""
        if self.dispatcher.pins_instances:
            return instances
        serving = [i for i in instances if i.serving]
        if not serving:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no live instance can serve {model!r} now")
        return serving

    async def _prefill(self, sub: Submission, attempt_id: str, prompt: list[int], sampling,
                       deadline: float | None, decode: Instance | None = None) -> ipb.PrefillResponse:
        instance = self.dispatcher.pick_prefill(attempt_id, sub.model, len(prompt),
                                                self._candidates(self.prefill, sub.model))
        request = ipb.PrefillRequest(request_id=attempt_id, model=sub.model, prompt_token_ids=prompt,
                                     sampling=sampling_to_pb(sampling), seed_offset=sampling.seed_offset,
                                     timeout_seconds=_left(deadline) or 0.0)
        if sub.table_slot is not None:
            request.table_slot = sub.table_slot
        request.kv_destination = self._kv_destination(instance, decode)
        try:
            with instance.load.hold(sub.model), tracing.span("proxy.prefill", instance=instance.name):
                return await self._on(instance, instance.stub.Prefill(request, timeout=_left(deadline)))
        finally:
            self.dispatcher.prefill_done(attempt_id)

    async def _decode(self, sub: Submission, attempt_id: str, prompt: list[int], sampling, instance: Instance,
                      prefilled: ipb.PrefillResponse, deadline: float | None, decoding: list[Instance],
                      streamed: list[int]) -> None:
        request = ipb.DecodeRequest(
            request_id=attempt_id, model=sub.model, prompt_token_ids=prompt,
            first_token_id=prefilled.first_token_id, sampling=sampling_to_pb(sampling),
            seed=prefilled.seed, kv=prefilled.kv, timeout_seconds=_left(deadline) or 0.0,
            seed_offset=sampling.seed_offset)
        if sub.table_slot is not None:
            request.table_slot = sub.table_slot
        decoding.append(instance)
        with tracing.span("proxy.decode", instance=instance.name):
            call = instance.stub.Decode(request, timeout=_left(deadline))
            try:
                while (chunk := await self._on(instance, call.read())) is not grpc.aio.EOF:
                    streamed.extend(chunk.token_ids)
                    sub.deliver(self._output(sub, chunk, len(streamed)))
            finally:
                call.cancel()  # a no-op once the stream ended; else the instance aborts (fencing)

    async def _on(self, instance: Instance, call):
        """Await a call on instance -> its result; InstanceLost if the instance is lost first (the
        call is cancelled) or the call fails UNAVAILABLE (the instance is marked lost)."""
        if instance.lost.is_set():  # a pinned instance, or lost since it was picked
            raise InstanceLost(instance.name)
        work = asyncio.ensure_future(call)
        lost = asyncio.ensure_future(instance.lost.wait())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not work.done():
                work.cancel()  # lost, or we were cancelled
            elif not work.cancelled():
                work.exception()  # mark it retrieved: an abandoned call's failure is no news
        if not work.done() or work.cancelled():
            raise InstanceLost(instance.name)
        try:
            return work.result()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE or (exc.code() == grpc.StatusCode.CANCELLED
                                                              and not instance.serving):
                self.mark_lost(instance, exc.details() or str(exc.code()))
                raise InstanceLost(instance.name) from None
            raise

    # -- health ----------------------------------------------------------------------------------

    async def _watch_health(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(i) for i in self.prefill + self.decode))
            await asyncio.sleep(HEALTH_PROBE_S)

    async def _probe(self, instance: Instance) -> None:
        try:
            call = instance.health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
            reply = await call
            incarnation = incarnation_of(await call.initial_metadata())
        except grpc.aio.AioRpcError as exc:
            instance.failed_probes += 1
            if instance.failed_probes >= LOST_AFTER:
                self.mark_lost(instance, f"{instance.failed_probes} health checks failed "
                                         f"({exc.code().name})")
            return
        instance.failed_probes = 0
        self._note_incarnation(instance, incarnation)
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        if instance.lost.is_set():
            if not serving:
                return
            if self.on_rejoin is not None:  # in step first, off the probe loop (it may add models)
                if instance.name not in self._rejoining:
                    self._rejoining[instance.name] = asyncio.create_task(self._rejoin(instance))
                return
            self._rejoined(instance)
        elif instance.serving and not serving:
            log.warning("instance %s is draining: no new work for it", instance.name)
        instance.serving = serving

    async def _rejoin(self, instance: Instance) -> None:
        try:
            in_step = await self.on_rejoin(instance)
        except Exception:  # noqa: BLE001 - a bug in the hook must not stop the probes
            log.exception("instance %s: bringing it in step failed; it stays out of service", instance.name)
            in_step = False
        finally:
            self._rejoining.pop(instance.name, None)
        if in_step and instance.lost.is_set() and instance.failed_probes == 0:
            self._rejoined(instance)

    def _note_incarnation(self, instance: Instance, incarnation: str) -> None:
        """A new process at the instance's address (restarted, maybe faster than the probes could lose
        it) is lost now: what the old one was given at run time died with it, so it rejoins only once
        on_rejoin has brought it in step, as any lost instance does."""
        known, instance.incarnation = instance.incarnation, incarnation or instance.incarnation
        if known and incarnation and incarnation != known:
            self.mark_lost(instance, "a new process answers at its address (restarted)")

    def _rejoined(self, instance: Instance) -> None:
        instance.lost = asyncio.Event()  # its abandoned calls stay abandoned: fenced
        instance.serving = True
        log.warning("instance %s answers again; it rejoins", instance.name)

    def mark_lost(self, instance: Instance, why: str) -> None:
        instance.serving = False
        if not instance.lost.is_set():
            log.warning("instance %s lost: %s; its requests go elsewhere", instance.name, why)
            instance.lost.set()

    async def _learn_timings(self) -> None:
        """Once: the models' prefill and switch times as a prefill instance profiled them."""
        if self.dispatcher.timings or self._timings_tried:
            return
        self._timings_tried = True
        with contextlib.suppress(grpc.aio.AioRpcError):
            status = await self.prefill[0].stub.Status(ipb.StatusRequest(), timeout=CLEANUP_TIMEOUT_S)
            self.dispatcher.timings.update({t.model: Timing(t.prefill_a, t.prefill_b, t.switch_s)
                                            for t in status.timings})

    async def _clean_up(self, request_id: str, decoding: list[Instance]) -> None:
        """After a cancellation or a failed call, free the request's KV wherever it may be: the
        hand-off pool (a handle published but never adopted, whatever the race) and the decode
        instance. Shielded from the cancellation that got us here; best-effort."""
        async def clean() -> None:
            for agent in self.agents:  # every node's: a cross-node hand-off holds blocks on both
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await agent.ReleaseAll(ipb.RequestRef(request_id=request_id), timeout=CLEANUP_TIMEOUT_S)
            for instance in decoding:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await instance.stub.Cancel(ipb.CancelRequest(request_id=request_id),
                                               timeout=CLEANUP_TIMEOUT_S)
        await asyncio.shield(clean())

    def _kv_destination(self, prefill: Instance, decode: Instance | None) -> str:
        """The decode node's agent when it is another node than the prefill's, else "" (this node)."""
        node = self.nodes.get(decode.name) if decode is not None else None
        if node is None or node == self.nodes.get(prefill.name):
            return ""
        return self.node_agents[node]

    def _clean_up_later(self, request_id: str, decoding: list[Instance]) -> None:
        """An abandoned attempt's clean-up, off the request's path (a hung instance may take the
        whole timeout to answer, or never)."""
        task = asyncio.get_running_loop().create_task(self._clean_up(request_id, decoding))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    @staticmethod
    def _first_output(sub: Submission, prefilled: ipb.PrefillResponse, num_output: int) -> RequestOutput:
        reason = FINISH_FROM_PB.get(prefilled.finish_reason)
        first = [prefilled.first_logprobs] if prefilled.HasField("first_logprobs") else []
        logprobs = logprobs_from_pb(first)
        return RequestOutput(sub.request_id, [prefilled.first_token_id], prefilled.first_text,
                             reason is not None, reason, len(sub.prompt), num_output, logprobs)

    @staticmethod
    def _output(sub: Submission, chunk: ipb.DecodeChunk, num_output: int) -> RequestOutput:
        reason = FINISH_FROM_PB.get(chunk.finish_reason)
        return RequestOutput(sub.request_id, list(chunk.token_ids), chunk.text, reason is not None, reason,
                             len(sub.prompt), num_output, logprobs_from_pb(chunk.logprobs))


def _connect(name: str, address: str, stub_class) -> Instance:
    channel = aio_channel(address)
    return Instance(name, address, channel, stub_class(channel), health=health_pb2_grpc.HealthStub(channel))


def _left(deadline: float | None) -> float | None:
    """Seconds to the deadline (at least a millisecond, so a passed one fails the call at once)."""
    return None if deadline is None else max(deadline - time.monotonic(), 1e-3)

