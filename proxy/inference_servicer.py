"""The public Inference service: protobuf in, validation, the backend, protobuf out.

Every bad request ends with a status code and a message naming the field and the
limit; nothing reaches the engine unless it fits.

Tokenize and Detokenize run the served model's tokenizer and chat template here, so a front
end (the HTTP gateway) needs no model files and follows the catalogue as it changes; token
texts of log-probabilities come in GenerateResponse for the same reason (no call per token).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

import grpc
import jinja2
from google.protobuf import unknown_fields
from tokenpool.engine.errors import InvalidRequestError, ModelFolderError
from tokenpool.engine.tokenizer import LONG_TEXT_CHARS
from tokenpool.protos.convert import FINISH_TO_PB, logprobs_to_pb, sampling_from_pb
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc
from tokenpool.telemetry import tracing

from .backend import Backend, BackendFullError, Submission
from .deferred_releases import DeferredReleases
from .progress_reporter import ProgressReporter
from .request_table import (
    MAX_REQUEST_ID_CHARS,
    DuplicateRequestError,
    RequestRecord,
    RequestState,
    RequestTable,
    TableFencedError,
    TableFullError,
    TableLockTimeout,
)
from .served_model import ServedModel

log = logging.getLogger(__name__)

RETRY_AFTER_MS = 1000  # the hint a refused-for-load request gets (trailing metadata "retry-after-ms")
RETRY_HINT = (("retry-after-ms", str(RETRY_AFTER_MS)),)
DRAIN_POLL_S = 0.05  # drained(): how often it looks
MAX_TOKENIZE_IDS = 1 << 18  # ids a Tokenize answer or a Detokenize request holds at most (~1.3 MB)


class RequestError(Exception):
    """A request that ends with this gRPC status (raised by the servicer or a backend)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def trailers(self) -> tuple:
        return RETRY_HINT if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED else ()


def _unknown_fields(message, path: str = "") -> list[str]:
    """Field numbers the message (or a message in it) carries that its schema does not define:
    fields only services set (KV handles, shared-memory names, offsets, peers) smuggled into a
    public request land here."""
    found = [f"{path}{f.field_number}" for f in unknown_fields.UnknownFieldSet(message)]
    for field, value in message.ListFields():
        if field.message_type is not None and not field.is_repeated:
            found += _unknown_fields(value, f"{path}{field.name}.")
    return found


def _check_schema(request) -> None:
    unknown = _unknown_fields(request)
    if unknown:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"fields {', '.join(unknown)} are not part of {request.DESCRIPTOR.full_name} "
                           "(fields only services set, such as KV handles, are refused)")


def model_state(model: str, statuses: list) -> dict:
    """ModelInfo's state fields from the instances' statuses (the reachable ones)."""
    resident = [s for s in statuses if s.active_model == model]
    if not statuses:
        state = ""
    elif resident:
        state = "resident"
    else:
        state = "host" if any(model in s.host_cached for s in statuses) else "disk"
    usage = max((s.kv_usage for s in resident), default=0.0)
    return {"state": state, "resident_on": sorted(s.name for s in resident),
            "requests": sum(s.requests_by_model.get(model, 0) for s in statuses), "kv_cache_usage": usage}


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, backend: Backend, models: dict[str, ServedModel], table: RequestTable,
                 metrics=None, registry=None) -> None:
        """metrics: a telemetry.proxy_metrics.ProxyMetrics to count requests in, or None; registry:
        where the progress writer counts its writes (tokenpool_table_reports_total), or None.

        A row is taken before the request goes on (admission must know at once): on the event loop
        for the shared-memory table, on a worker thread for a remote one (Redis), whose round trip
        may stall; it is ended through DeferredReleases (a remote table's from its thread). The
        tokens a stream has so far go through a ProgressReporter, off the loop and merged per
        request: a Redis table would otherwise cost a round trip for every chunk of every stream."""
        self.backend = backend
        self.models = models
        self.table = table
        self.metrics = metrics
        self.progress = ProgressReporter(lambda: table, registry, name="proxy", close_table=False)
        self.releases = DeferredReleases(table)  # rows a stalled instance holds locked at the end
        self._streaming: dict[int, Submission] = {}  # submitted, not ended (by id): end_streams' reach

    def close(self) -> None:
        """Stop the progress writer (after what is pending, briefly); the table stays open."""
        self.progress.close()
        self.releases.close()

    async def drained(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for every stream in flight to end -> whether they all did."""
        deadline = time.monotonic() + timeout_s
        while self._streaming and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return not self._streaming

    def end_streams(self, code: grpc.StatusCode, message: str) -> int:
        """End every stream in flight with this status (after the tokens already queued for it) and
        cancel its request -> how many. Loop thread only."""
        for sub in self._streaming.values():
            sub.outputs.put_nowait(RequestError(code, message))
        return len(self._streaming)

    async def ListModels(self, request, context):
        statuses = [s for s in await self.backend.statuses() if "unreachable" not in s.role]
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(id=m.id, architecture=m.architecture, max_context=m.max_context,
                         weight_bytes=m.weight_bytes, **model_state(m.id, statuses))
            for m in self.models.values()])

    async def Tokenize(self, request, context):
        try:
            model = self._model(request)
            ids = await asyncio.to_thread(self._tokenize, request, model)  # long texts: off the loop
        except RequestError as exc:
            await context.abort(exc.code, str(exc))
        return pb.TokenizeResponse(ids=ids, max_context=model.max_context)

    async def Detokenize(self, request, context):
        try:
            model = self._model(request)
            ids = _checked_ids(list(request.ids), model)
        except RequestError as exc:
            await context.abort(exc.code, str(exc))
        return pb.DetokenizeResponse(text=await asyncio.to_thread(model.tokenizer.decode, ids))

    async def Generate(self, request, context):
        start = time.perf_counter()
        try:
            # Long texts go to a worker thread: the tokenizer lets go of the GIL only for them (a
            # tiny model's took 40 s for 1 MiB on a loaded core, every stream stalled meanwhile).
            if len(request.text) > LONG_TEXT_CHARS:
                sub = await asyncio.to_thread(self._submission, request, context.time_remaining())
            else:
                sub = self._submission(request, context.time_remaining())
            # A remote table (Redis) is a round trip, seconds if its server stalls: not on the loop.
            remote = self.table.remote
            sub.table_slot = await asyncio.to_thread(self._admit, sub) if remote else self._admit(sub)
        except RequestError as exc:
            self._rejected(request.model)
            await context.abort(exc.code, str(exc), trailing_metadata=exc.trailers)
        except InvalidRequestError as exc:
            self._rejected(request.model)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        tracing.annotate(model=sub.model, request_id=sub.request_id, prompt_tokens=len(sub.prompt))
        timer = self.metrics.admitted(sub.model, start) if self.metrics is not None else None
        state, submitted, outcome = RequestState.FAILED, False, "rejected"
        try:
            await self._submit(sub, context)
            submitted, state, outcome = True, RequestState.CANCELLED, "failed"
            self._streaming[id(sub)] = sub
            async for response in self._stream(sub, start, context, timer):
                yield response
            state, outcome = RequestState.FINISHED, "finished"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            self._streaming.pop(id(sub), None)
            if submitted and state is not RequestState.FINISHED:
                self.backend.cancel(sub)  # client gone, deadline passed or failed: free the KV
            self.releases.end(sub.table_slot, state)
            if timer is not None:
                timer.ended(outcome)
            tracing.annotate(outcome=outcome)

    def _rejected(self, model: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(model)

    def _admit(self, sub: Submission) -> int:
        """A row in the request table; RESOURCE_EXHAUSTED when it is full."""
        now = time.time_ns()
        deadline = now + int(sub.timeout_s * 1e9) if sub.timeout_s is not None else 0
        record = RequestRecord(request_id=sub.request_id, model=sub.model, num_prompt_tokens=len(sub.prompt),
                               created_ns=now, updated_ns=now, deadline_ns=deadline, proxy_pid=os.getpid())
        try:
            return self.table.insert(record)
        except TableFullError as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later") from None
        except DuplicateRequestError:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                               f"request_id {sub.request_id!r} is already in flight") from None
        except (TableFencedError, TableLockTimeout) as exc:  # fenced by a shared table, or locked by a
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None  # stalled process: retry
        except ValueError as exc:  # a record past the table's limits
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request table: {exc}") from None
        except Exception as exc:  # noqa: BLE001 -- e.g. Redis not answering within its socket timeout
            log.warning("request %s: the request table failed: %s", sub.request_id, exc)
            self.releases.retract(record)  # the insert may still happen: its row must not stay
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"the request table failed: {exc}; "
                               f"retry later") from None

    async def _submit(self, sub: Submission, context) -> None:
        try:
            await self.backend.submit(sub)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except BackendFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later",
                                trailing_metadata=RETRY_HINT)
        except RequestError as exc:
            await context.abort(exc.code, str(exc), trailing_metadata=exc.trailers)

    async def _stream(self, sub: Submission, start: float, context, timer=None):
        first = None
        while (item := await sub.outputs.get()) is not None:
            if isinstance(item, RequestError):
                await context.abort(item.code, str(item), trailing_metadata=item.trailers)
            if isinstance(item, Exception):
                await context.abort(grpc.StatusCode.INTERNAL, f"the engine failed: {item}")
            first = first or time.perf_counter()
            if timer is not None:
                timer.tokens(len(item.new_token_ids))
            self.progress.report(sub.table_slot, sub.request_id, state=RequestState.DECODING,
                                 num_output_tokens=item.num_output_tokens)
            yield self._response(item, sub.request_id, len(sub.prompt), first - start,
                                 self.models.get(sub.model))
            if item.finished:
                return

    def _submission(self, request, timeout_s: float | None) -> Submission:
        _check_schema(request)
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request_id has {len(request_id)} "
                               f"characters; the limit is {MAX_REQUEST_ID_CHARS}")
        model = self._served(request.model)
        ids = self._prompt_ids(request, model)
        if len(ids) >= model.max_context:
            raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                               f"prompt has {len(ids)} tokens; the context of {model.id} is "
                               f"{model.max_context} and at least one token must be left to generate")
        sampling = sampling_from_pb(request.sampling, model.max_context)
        _check_in_vocabulary([t for t, _ in sampling.logit_bias], model, "sampling.logit_bias: token ids")
        return Submission(request_id, model.id, ids, sampling, timeout_s=timeout_s)

    def _model(self, request) -> ServedModel:
        """The served model a Tokenize or Detokenize request names, once it is in its schema."""
        _check_schema(request)
        return self._served(request.model)

    def _served(self, model_id: str) -> ServedModel:
        model = self.models.get(model_id)
        if model is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {model_id!r} is not served here; "
                               f"models: {', '.join(sorted(self.models))}")
        return model

    @staticmethod
    def _tokenize(request: pb.TokenizeRequest, model: ServedModel) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "chat":
            if not request.chat.messages:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "chat.messages is empty: give at "
                                   "least one message")
            ids = _chat_ids(model, [{"role": m.role, "content": m.content} for m in request.chat.messages])
        else:
            special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = model.tokenizer.encode(request.text, add_special_tokens=special)
        if len(ids) > MAX_TOKENIZE_IDS:
            raise RequestError(grpc.StatusCode.OUT_OF_RANGE, f"the input encodes to {len(ids)} tokens; "
                               f"Tokenize returns at most {MAX_TOKENIZE_IDS}")
        return ids

    @staticmethod
    def _prompt_ids(request, model: ServedModel) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
        elif request.chat:
            ids = _chat_ids(model, [{"role": "user", "content": request.text}])
        else:
            ids = model.tokenizer.encode(request.text) if request.text else []
        if not ids:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty: set text or token_ids")
        return ids

    @staticmethod
    def _response(out, request_id: str, prompt_tokens: int, ttft: float,
                  model: ServedModel | None) -> pb.GenerateResponse:
        response = pb.GenerateResponse(token_ids=out.new_token_ids, text=out.text, request_id=request_id,
                                       logprobs=logprobs_to_pb(out.logprobs))
        if response.logprobs and model is not None:
            _name_tokens(response, model)
        if out.finished:
            response.finish_reason = FINISH_TO_PB[out.finish_reason]
            response.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens,
                                             completion_tokens=out.num_output_tokens, ttft_seconds=ttft))
        return response


def _chat_ids(model: ServedModel, turns: list[dict]) -> list[int]:
    """The model's chat template over turns, encoded; a template that cannot render them (none in
    the folder, or one that raises on these roles) is the caller's INVALID_ARGUMENT."""
    try:
        return model.tokenizer.encode_chat(turns)
    except (ModelFolderError, ValueError, jinja2.TemplateError) as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"chat: {model.id}: {exc}") from None


def _checked_ids(ids: list[int], model: ServedModel) -> list[int]:
    if len(ids) > MAX_TOKENIZE_IDS:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"ids has {len(ids)} tokens; the limit is "
                           f"{MAX_TOKENIZE_IDS}")
    _check_in_vocabulary(ids, model, "ids")
    return ids


def _check_in_vocabulary(ids: list[int], model: ServedModel, what: str) -> None:
    vocab = model.tokenizer.backend.get_vocab_size()
    if any(t >= vocab for t in ids):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be below {model.id}'s "
                           f"vocabulary size {vocab}")


def _name_tokens(response: pb.GenerateResponse, model: ServedModel) -> None:
    """Each log-probability's token text, so clients show tokens without the model's tokenizer."""
    decode = model.tokenizer.decode
    for token_id, entry in zip(response.token_ids, response.logprobs, strict=False):
        entry.token = decode([token_id])
        for candidate in entry.top:
            candidate.token = decode([candidate.token_id])
