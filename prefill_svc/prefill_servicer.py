"""PrefillServicer: the Prefill service of one prefill instance.

A request is queued in arrival order (FIFO turns on the engine thread; the Aegaeon
grouped-FCFS policy plugs in there later). When its first token is sampled, the engine
thread publishes the prompt's KV through the KV transport and forgets the sequence, so
the device blocks are free for the next prompt before the RPC even answers:

    Prefill RPC -> post(add_request) -> ... step ... -> on_output: first token
                -> transport.publish(KV) -> abort (frees device blocks) -> PrefillResponse

With stream_kv the KV leaves while the prompt computes: at its turn the request's pool blocks
are allocated (transport.begin) and each layer goes out as soon as the forward pass has written
it, so at the first token only the last layer's copy is left (stream.finish). A request whose
kv_destination names another node's agent has its KV moved there (NIXL), streamed or not.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass

import grpc
from tokenpool.cli.instance_catalogue import InstanceCatalogue
from tokenpool.engine.engine_worker import EngineWorker
from tokenpool.engine.errors import InvalidRequestError
from tokenpool.engine.host_model_cache import CacheFullError
from tokenpool.engine.multi_model_engine import MultiModelEngine
from tokenpool.engine.request_book import RequestOutput
from tokenpool.engine.slab_allocator import KVPoolFullError
from tokenpool.engine.step_profiler import InstanceTimings
from tokenpool.kvtransfer.handle import KVHandleInfo, handle_to_pb
from tokenpool.kvtransfer.kv_stream import KVStream
from tokenpool.kvtransfer.transport import KVTransferError, KVTransport
from tokenpool.protos.convert import FINISH_TO_PB, instance_status, logprobs_to_pb, sampling_from_pb
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.proxy.progress_reporter import ProgressReporter
from tokenpool.proxy.request_table import RequestState
from tokenpool.telemetry import tracing
from tokenpool.telemetry.turn_tracer import TurnTracer

from .prefill_scheduler import MAX_GROUP_SIZE, PrefillQueue
from .prefill_turns import GroupedFcfsTurns


@dataclass
class _Pending:
    """A prompt being prefilled; resolved on the engine thread, awaited on the event loop."""

    model: str
    seed: int
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future  # -> (RequestOutput, KVHandleInfo | None)
    destination: str = ""  # another node's kvtransfer agent to move the KV to; "" = this node
    trace: object | None = None  # the request's trace context (tracing on)
    queue_span: object | None = None  # open while the request waits in the queue
    publish_span: object | None = None  # streamed: open from the blocks' allocation to their hand-off


class PrefillServicer(instances_pb2_grpc.PrefillServicer):
    def __init__(self, name: str, engine: MultiModelEngine, transport: KVTransport,
                 progress: ProgressReporter | None = None, timings: InstanceTimings | None = None,
                 max_group_size: int = MAX_GROUP_SIZE, policy: str = "aegaeon", metrics=None,
                 stream_kv: bool = False) -> None:
        """timings: to estimate queued prefill time (and report); max_group_size 1 is plain FCFS.
        metrics: a telemetry.instance_metrics.InstanceMetrics to report to, or None.
        stream_kv: publish each layer's KV as the prefill computes it (else all of it after)."""
        self.name = name
        self.engine = engine
        self.transport = transport
        self.progress = progress  # the proxies' request table, written off the event loop
        self.timings = timings
        self.policy = policy
        self.queue = PrefillQueue(max_group_size)  # engine thread only
        self._queued: dict[str, tuple] = {}  # request id -> (request, sampling), waiting in the queue
        self._queued_models: Counter[str] = Counter()  # model -> requests in _queued; read from any thread
        engine.queued_before = lambda model: self._queued_models.get(model, 0) > 0  # keeps their weights
        self._pending: dict[str, _Pending] = {}  # engine thread only
        self.stream_kv = stream_kv
        self._streams: dict[str, KVStream] = {}  # engine thread only: KV streaming out
        # Published and not yet answered: a caller that goes away meanwhile gets its KV released.
        self._published: dict[str, KVHandleInfo] = {}
        self._published_lock = threading.Lock()
        self.metrics = metrics
        self.turns = TurnTracer("prefill.compute") if tracing.enabled() else None
        observers = tuple(o for o in (metrics, self.turns) if o is not None)
        self.catalogue = InstanceCatalogue(name, timings, self._queued_by_model)
        self.worker = EngineWorker(engine, GroupedFcfsTurns(self.queue, self._start), self._on_output,
                                   self._on_failure, name, observers)
        if metrics is not None:
            metrics.bind(self.worker, self._queued_by_model)

    async def Prefill(self, request, context):
        if request.model not in self.engine.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not registered on "
                                f"{self.name}; registered: {', '.join(sorted(self.engine.models))}")
        outcome = "failed"
        try:
            response = await self._prefill(request, context)
            outcome = "prefilled"
            return response
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if self.metrics is not None:
                self.metrics.request_ended(request.model, outcome)

    async def _prefill(self, request, context) -> ipb.PrefillResponse:
        loop = asyncio.get_running_loop()
        pending = _Pending(request.model, 0, loop, loop.create_future(), request.kv_destination,
                           tracing.capture())
        try:
            await asyncio.wrap_future(self.worker.post(lambda e: self._accept(e, request, pending)))
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:  # the caller left during queueing: take the request out again
            self._cancel(request.request_id, pending)  # (else it would publish KV nobody frees)
            raise
        slot = request.table_slot if request.HasField("table_slot") else None
        self._report(slot, request.request_id, state=RequestState.PREFILLING,
                     prefill_instance=self.name)
        try:
            out, handle = await pending.done
        except asyncio.CancelledError:
            self._cancel(request.request_id, pending)
            raise
        except (KVPoolFullError, CacheFullError) as exc:  # the host cache: its room held past --load-wait-s
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.name}: {exc}")
        except KVTransferError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: KV hand-off failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - the engine failed this model's requests
            await context.abort(grpc.StatusCode.INTERNAL, f"{self.name}: prefill failed: {exc}")
        with self._published_lock:  # answered: the proxy owns the handle now
            self._published.pop(request.request_id, None)
        self._report(slot, request.request_id, state=RequestState.TRANSFERRING)
        return self._response(out, handle, pending.seed)

    async def Status(self, request, context):
        status = await asyncio.wrap_future(self.worker.post(
            lambda e: self._status(e)))
        return status

    async def Catalogue(self, request, context):
        return await self.catalogue.answer(self.worker, request, context)

    def close(self) -> None:
        self.worker.close()

    def _report(self, slot: int | None, request_id: str, **changes) -> None:
        """Progress into the request table, if one is attached: queued for a writer thread, so a slow
        or unreachable table never holds up the event loop or the engine."""
        if self.progress is not None:
            self.progress.report(slot, request_id, **changes)

    def _queued_by_model(self, engine: MultiModelEngine) -> dict[str, int]:
        return dict(self._queued_models)

    def _status(self, engine: MultiModelEngine) -> ipb.InstanceStatus:
        status = instance_status(engine, self.name, "prefill", len(self.queue), self.policy, self.timings)
        status.groups.extend(f"{g.model} x{len(g.request_ids)}" for g in self.queue.groups())
        return status

    # -- engine thread ----------------------------------------------------------

    def _accept(self, engine: MultiModelEngine, request, pending: _Pending) -> None:
        """Validate and queue (grouped FCFS); the engine gets the request at its turn."""
        book = engine.models[request.model].book
        sampling = sampling_from_pb(request.sampling, book.max_model_len, request.seed_offset)
        book.check_prompt(list(request.prompt_token_ids))
        if request.request_id in self._pending:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        tokens = len(request.prompt_token_ids)
        estimate = self.timings.prefill_seconds(request.model, tokens) if self.timings else 0.0
        pending.queue_span = tracing.start_child(pending.trace, "prefill.queue", model=request.model,
                                                 queued_ahead=len(self.queue), prompt_tokens=tokens)
        self.queue.add(request.request_id, request.model, estimate)
        self._queued[request.request_id] = (request, sampling)
        self._queued_models[request.model] += 1
        engine.note_arrival(request.model)
        self._pending[request.request_id] = pending

    def _unqueue(self, request_id: str) -> tuple | None:
        """Take a request out of _queued (its turn came, or it went) -> (request, sampling) or None."""
        entry = self._queued.pop(request_id, None)
        if entry is not None:
            model = entry[0].model
            self._queued_models[model] -= 1
            if self._queued_models[model] <= 0:
                del self._queued_models[model]
        return entry

    def _start(self, request_id: str) -> bool:
        """The queue's turn for a request: into the engine (False if it was cancelled meanwhile)."""
        entry = self._unqueue(request_id)
        pending = self._pending.get(request_id)
        if entry is None or pending is None:
            return False
        _end_queue_span(pending)
        request, sampling = entry
        try:
            seq = self.engine.add_request(request.model, list(request.prompt_token_ids), sampling,
                                          request_id=request_id)
        except InvalidRequestError as exc:
            self._pending.pop(request_id, None)
            self._settle(pending, exception=exc)
            return False
        pending.seed = seq.seed
        if self.stream_kv and not self._begin_stream(request, pending):
            return False
        self.worker.track(request_id, request.model)
        if self.turns is not None:
            self.turns.begin(request_id, pending.trace)
        return True

    def _begin_stream(self, request, pending: _Pending) -> bool:
        """Allocate the prompt's pool blocks and stream its KV into them as it computes -> False (the
        request dropped, its RPC failed) when they cannot be had."""
        shape = self.engine.models[request.model].shape
        num_blocks = -(-len(request.prompt_token_ids) // shape.block_size)
        pending.publish_span = tracing.start_child(
            pending.trace, "kv.publish", model=request.model, kv_blocks=num_blocks,
            kv_bytes=num_blocks * shape.nbytes, kv_tokens=len(request.prompt_token_ids),
            kv_path="nixl" if pending.destination else self.transport.kind, kv_streamed=True)
        try:
            with tracing.within(pending.publish_span):
                stream = self.transport.begin(request.request_id, shape, num_blocks, pending.destination)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting RPC
            _end_publish_span(pending)
            self._pending.pop(request.request_id, None)
            self.engine.abort(request.model, request.request_id)
            self._settle(pending, exception=exc)
            return False
        self._streams[request.request_id] = stream
        self.engine.stream_kv(request.model, request.request_id, stream.put)
        return True

    def _on_output(self, model: str, out: RequestOutput) -> None:
        pending = self._pending.pop(out.request_id, None)
        if pending is None:
            return
        if self.turns is not None:
            self.turns.forget(out.request_id)
        stream = self._streams.pop(out.request_id, None)
        if stream is not None:
            self.engine.stop_stream(model, out.request_id)
        try:
            if out.finished and stream is not None:
                stream.abort()  # the first token ended it: no KV to hand on
                _end_publish_span(pending)
            handle = None if out.finished else self._publish(model, out, pending, stream)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting RPC
            self._settle(pending, exception=exc)
        else:
            self._settle(pending, result=(out, handle))
        finally:
            if not out.finished:
                self.engine.abort(model, out.request_id)  # the KV lives on in the pool: free the device
                self.worker.forget(out.request_id)

    def _publish(self, model: str, out: RequestOutput, pending: _Pending,
                 stream: KVStream | None = None) -> KVHandleInfo:
        if stream is not None:
            try:
                with tracing.within(pending.publish_span):
                    handle = stream.finish(out.num_prompt_tokens)
            finally:
                _end_publish_span(pending)
        else:
            shape, blocks = self.engine.handoff_blocks(model, out.request_id)
            with tracing.child_span(pending.trace, "kv.publish", model=model, kv_blocks=len(blocks),
                                    kv_bytes=len(blocks) * shape.nbytes, kv_tokens=out.num_prompt_tokens,
                                    kv_path="nixl" if pending.destination else self.transport.kind,
                                    kv_streamed=False):
                handle = self.transport.publish(out.request_id, shape, blocks, out.num_prompt_tokens,
                                                pending.destination)
        with self._published_lock:
            self._published[out.request_id] = handle
        return handle

    def _on_failure(self, model: str, exc: Exception) -> None:
        for request_id, pending in list(self._pending.items()):
            if pending.model == model:
                self._drop(request_id, pending)
                self._settle(pending, exception=exc)

    def _drop(self, request_id: str, pending: _Pending) -> None:
        _end_queue_span(pending)
        if self.turns is not None:
            self.turns.forget(request_id)
        self._pending.pop(request_id, None)
        self._unqueue(request_id)
        self.queue.remove(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:  # first: its copy thread may still read the device blocks
            stream.abort()
            _end_publish_span(pending)
        self.engine.abort(pending.model, request_id)
        self.worker.forget(request_id)

    def _cancel(self, request_id: str, pending: _Pending) -> None:
        """The caller went away: stop the prompt, or give back KV already published."""
        def cancel(engine: MultiModelEngine) -> None:
            if request_id in self._pending:
                self._drop(request_id, pending)
            with self._published_lock:
                handle = self._published.pop(request_id, None)
            if handle is not None:
                self.transport.release(handle)
        self.worker.post(cancel)

    @staticmethod
    def _settle(pending: _Pending, result=None, exception: Exception | None = None) -> None:
        def settle() -> None:
            if pending.done.done():
                return
            if exception is not None:
                pending.done.set_exception(exception)
            else:
                pending.done.set_result(result)
        pending.loop.call_soon_threadsafe(settle)

    @staticmethod
    def _response(out: RequestOutput, handle: KVHandleInfo | None, seed: int) -> ipb.PrefillResponse:
        response = ipb.PrefillResponse(first_token_id=out.new_token_ids[0], first_text=out.text, seed=seed)
        if out.finished:
            response.finish_reason = FINISH_TO_PB[out.finish_reason]
        if out.logprobs:
            response.first_logprobs.CopyFrom(logprobs_to_pb(out.logprobs)[0])
        if handle is not None:
            response.kv.CopyFrom(handle_to_pb(handle))
        return response


def _end_publish_span(pending: _Pending) -> None:
    if pending.publish_span is not None:
        pending.publish_span.end()
        pending.publish_span = None


def _end_queue_span(pending: _Pending) -> None:
    if pending.queue_span is not None:
        pending.queue_span.end()
        pending.queue_span = None
