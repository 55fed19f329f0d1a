"""DecodeServicer: the Decode service of one decode instance.

A prefilled sequence arrives with a KV handle. The instance maps the handed-over blocks,
stages them into its own host KV pool (engine.adopt), releases the handle, and the
sequence joins its model's batch when that model next gets the device. Models take turns
round-robin (the Aegaeon weighted round-robin plugs in there later); each step's tokens
go back on the request's stream, several steps coalesced into one chunk when the client
reads slower than the engine produces.

    Decode RPC -> hold(handle) -> fetch(handle) -> post(adopt) -> release(handle) -> chunks ... -> last chunk
    (a held handle's lease is renewed at its agent every RENEW_INTERVAL_S, kvtransfer/lease.py;
    if this process dies holding it, the agent frees the blocks when the lease runs out)
    client gone / Cancel RPC -> post(abort): frees device blocks and pool blocks
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
from tokenpool.cli.instance_catalogue import InstanceCatalogue
from tokenpool.engine.engine_worker import EngineWorker
from tokenpool.engine.errors import InvalidRequestError
from tokenpool.engine.host_model_cache import CacheFullError
from tokenpool.engine.multi_model_engine import MultiModelEngine
from tokenpool.engine.request_book import RequestOutput
from tokenpool.engine.slab_allocator import KVPoolFullError
from tokenpool.engine.step_profiler import InstanceTimings
from tokenpool.engine.turn_policy import RoundRobinTurns, TurnPolicy
from tokenpool.kvtransfer.handle import KVHandleInfo, handle_from_pb
from tokenpool.kvtransfer.lease import LeaseRenewer
from tokenpool.kvtransfer.transport import KVTransferError, KVTransport
from tokenpool.protos.convert import FINISH_TO_PB, instance_status, logprobs_to_pb, sampling_from_pb
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.proxy.progress_reporter import ProgressReporter
from tokenpool.proxy.request_table import RequestState
from tokenpool.telemetry import tracing
from tokenpool.telemetry.instance_metrics import DecodeRound
from tokenpool.telemetry.turn_tracer import TurnTracer

from .decode_scheduler import DecodeScheduler


@dataclass
class _Stream:
    model: str
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)  # RequestOutput, or an Exception
    trace: object | None = None  # the request's trace context (tracing on)


class DecodeServicer(instances_pb2_grpc.DecodeServicer):
    def __init__(self, name: str, engine: MultiModelEngine, transport: KVTransport,
                 progress: ProgressReporter | None = None, policy: TurnPolicy | None = None,
                 policy_name: str = "round-robin", timings: InstanceTimings | None = None,
                 metrics=None) -> None:
        """policy: how co-located models take turns (make_decode_policy); plain round-robin if None.
        metrics: a telemetry.instance_metrics.InstanceMetrics to report to, or None."""
        self.name = name
        self.engine = engine
        self.transport = transport
        self.progress = progress  # the proxies' request table, written off the event loop
        self.policy = policy or RoundRobinTurns()
        self.policy_name = policy_name
        self.timings = timings
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self.metrics = metrics
        self.turns = TurnTracer("decode.turn") if tracing.enabled() else None
        observers = tuple(o for o in (metrics, self.turns) if o is not None)
        self.catalogue = InstanceCatalogue(name, timings)
        self.worker = EngineWorker(engine, self.policy, self._on_output, self._on_failure, name, observers)
        self.leases = LeaseRenewer(lambda ids: asyncio.to_thread(transport.renew, ids))
        if metrics is not None:
            metrics.bind(self.worker, _queued_by_model, self._last_round)

    async def Decode(self, request, context):
        outcome = "failed"
        try:
            async for chunk in self._decode(request, context):
                yield chunk
            outcome = "finished"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            if self.metrics is not None and request.model in self.engine.models:
                self.metrics.request_ended(request.model, outcome)

    async def _decode(self, request, context):
        trace = tracing.capture()
        with tracing.span("decode.admission", model=request.model, kv_blocks=len(request.kv.block_offsets),
                          kv_tokens=request.kv.num_tokens):
            stream = await self._adopt(request, context, trace)
        slot = request.table_slot if request.HasField("table_slot") else None
        self._report(slot, request.request_id, state=RequestState.DECODING,
                     decode_instance=self.name)
        finished = False
        try:
            while not finished:
                outputs = await self._next_outputs(stream, context)
                finished = outputs[-1].finished
                self._report(slot, request.request_id,
                             num_output_tokens=outputs[-1].num_output_tokens)
                yield self._chunk(outputs)
        finally:
            if not finished:  # the proxy went away or cancelled: free the KV
                self.worker.post(lambda e: self._abort(e, request.request_id))

    async def Cancel(self, request, context):
        found = await asyncio.wrap_future(self.worker.post(lambda e: self._abort(e, request.request_id)))
        return ipb.CancelResponse(found=found)

    async def Status(self, request, context):
        return await asyncio.wrap_future(self.worker.post(self._status))

    async def Catalogue(self, request, context):
        return await self.catalogue.answer(self.worker, request, context)

    def _status(self, engine: MultiModelEngine) -> ipb.InstanceStatus:
        arriving = sum(len(m.arriving) for m in engine.models.values())
        status = instance_status(engine, self.name, "decode", arriving, self.policy_name, self.timings)
        if isinstance(self.policy, DecodeScheduler):
            status.tbt_target_s = self.policy.config.tbt_target_s
            status.kv_swap_correction = self.policy.swap_correction
            last = self.policy.last
            if last is not None:
                status.alpha = last.plan.alpha
                status.round_switch_s = last.plan.switch_s
                status.quotas_s.update(zip(last.models, last.plan.quotas, strict=True))
        return status

    def close(self) -> None:
        self.leases.close()
        self.worker.close()

    def _report(self, slot: int | None, request_id: str, **changes) -> None:
        """Progress into the request table, if one is attached: queued for a writer thread, so a slow
        or unreachable table never holds up the event loop or the engine."""
        if self.progress is not None:
            self.progress.report(slot, request_id, **changes)

    def _last_round(self) -> DecodeRound | None:
        """Engine thread: the last round as planned (aegaeon), for metrics."""
        last = self.policy.last if isinstance(self.policy, DecodeScheduler) else None
        if last is None:
            return None
        return DecodeRound(last.plan.alpha, dict(zip(last.models, last.plan.quotas, strict=True)),
                           last.plan.switch_s, self.policy.swap_correction)

    async def _adopt(self, request, context, trace=None) -> _Stream:
        """Map the handed-over KV, stage it on this instance and release the handle."""
        if request.model not in self.engine.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not registered on "
                                f"{self.name}; registered: {', '.join(sorted(self.engine.models))}")
        try:
            handle = handle_from_pb(request.kv)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kv: {exc}")
        stream = _Stream(request.model, asyncio.get_running_loop(), trace=trace)
        self.leases.hold(handle.handle_id)  # renewed until released, so the agent keeps the blocks
        try:
            await asyncio.wrap_future(self.worker.post(lambda e: self._accept(e, request, handle, stream)))
        except (InvalidRequestError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {exc}")
        except KVPoolFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.name}: {exc}")
        except KVTransferError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: KV hand-off failed: {exc}")
        except asyncio.CancelledError:  # gone while the adoption was queued: undo it when it runs
            self.worker.post(lambda e: self._abort(e, request.request_id))
            raise
        finally:
            self.leases.let_go(handle.handle_id)
            released = await asyncio.to_thread(self.transport.release, handle)  # traced under this span
        if not released:  # reclaimed while held (this process hung past the lease, or the proxy gave
            # up on the request): the blocks may have held another request's KV while they were copied
            self.worker.post(lambda e: self._abort(e, request.request_id))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: the KV handle "
                                f"{handle.handle_id} was reclaimed before it was adopted (lease ran out)")
        return stream

    @staticmethod
    async def _next_outputs(stream: _Stream, context) -> list[RequestOutput]:
        """The next output, plus any others already queued (one chunk for several steps)."""
        items = [await stream.outputs.get()]
        while not stream.outputs.empty() and not getattr(items[-1], "finished", True):
            items.append(stream.outputs.get_nowait())
        for item in items:
            if isinstance(item, CacheFullError):  # its model's room in the host cache stayed held
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode failed: {item}")
            if isinstance(item, Exception):
                await context.abort(grpc.StatusCode.INTERNAL, f"decode failed: {item}")
        return items

    @staticmethod
    def _chunk(outputs: list[RequestOutput]) -> ipb.DecodeChunk:
        last = outputs[-1]
        chunk = ipb.DecodeChunk(token_ids=[t for o in outputs for t in o.new_token_ids],
                                text="".join(o.text for o in outputs),
                                num_output_tokens=last.num_output_tokens,
                                logprobs=logprobs_to_pb([lp for o in outputs for lp in o.logprobs]))
        if last.finished:
            chunk.finish_reason = FINISH_TO_PB[last.finish_reason]
        return chunk

    # -- engine thread ----------------------------------------------------------

    def _accept(self, engine: MultiModelEngine, request, handle: KVHandleInfo, stream: _Stream) -> None:
        model = engine.models[request.model]
        if handle.shape != model.shape:
            raise ValueError(f"the handed-over KV blocks are {handle.shape}, {request.model} here "
                             f"needs {model.shape} (prefill and decode must agree on dtype and block size)")
        if handle.num_tokens != len(request.prompt_token_ids):
            raise ValueError(f"the KV holds {handle.num_tokens} tokens, the prompt has "
                             f"{len(request.prompt_token_ids)}")
        sampling = sampling_from_pb(request.sampling, model.book.max_model_len, request.seed_offset)
        blocks = self.transport.fetch(handle)
        engine.adopt(request.model, request.request_id, list(request.prompt_token_ids),
                     request.first_token_id, sampling, request.seed, blocks)
        self._streams[request.request_id] = stream
        self.worker.track(request.request_id, request.model)
        if self.turns is not None:
            self.turns.begin(request.request_id, stream.trace)

    def _abort(self, engine: MultiModelEngine, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            engine.abort(stream.model, request_id)
            self.worker.forget(request_id)
            if self.turns is not None:
                self.turns.forget(request_id)
        return stream is not None

    def _on_output(self, model: str, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, out)

    def _on_failure(self, model: str, exc: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            if stream.model == model:
                self._abort(self.engine, request_id)
                stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, exc)


def _queued_by_model(engine: MultiModelEngine) -> dict[str, int]:
    """Engine thread: adopted sequences not yet in their batch, and waiting ones, per model."""
    return {m: len(x.arriving) + len(x.book.scheduler.waiting) for m, x in engine.models.items()}
