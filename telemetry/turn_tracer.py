"""TurnTracer: spans for the engine thread's turns, under each request's own trace.

Contexts do not cross into the engine thread by themselves, so a servicer hands each
request's captured context over when the engine takes the request (begin) and drops it
when the request leaves (forget). At the end of every turn, each request that produced a
token in it gets one span for the turn (from the turn's start, or from when the request
joined, if that was during the turn), and, when the turn began with a model switch the
request was there for, a child span for the switch (weight bytes, seconds, KV swapped out
and in):

    Decode (server span)
      decode.turn  model=tiny-llama tokens=7 steps=7      <- one per turn the request was in
        model.switch  weight_bytes=... seconds=...        <- when that turn switched models

Installed only while tracing is on (a servicer creates none otherwise).
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace
from tokenpool.engine.engine_worker import WorkerObserver
from tokenpool.engine.multi_model_engine import SwitchRecord
from tokenpool.engine.request_book import RequestOutput

from . import tracing


class TurnTracer(WorkerObserver):
    def __init__(self, turn_span_name: str) -> None:
        """turn_span_name: e.g. 'decode.turn', 'prefill.compute'."""
        self.turn_span_name = turn_span_name
        self._contexts: dict[str, otel_context.Context] = {}  # request id -> its trace (engine thread)
        self._joined_ns: dict[str, int] = {}  # request id -> when the engine took it
        self._leaving: set[str] = set()
        self._tokens: dict[str, int] = {}  # this turn's requests -> tokens they got in it
        self._model = ""
        self._steps = 0
        self._started_ns = 0
        self._switch: SwitchRecord | None = None

    def begin(self, request_id: str, context: otel_context.Context | None) -> None:
        if context is not None:
            self._contexts[request_id] = context
            self._joined_ns[request_id] = tracing.now_ns()

    def forget(self, request_id: str) -> None:
        """The request left this instance; its spans of the current turn are still written."""
        self._leaving.add(request_id)

    def turn_started(self) -> None:
        self._started_ns = tracing.now_ns()
        self._switch, self._steps = None, 0
        self._tokens.clear()

    def switched(self, record: SwitchRecord) -> None:
        self._switch = record

    def stepped(self, model: str, outputs: list[RequestOutput]) -> None:
        self._model = model
        self._steps += 1
        for out in outputs:
            if out.request_id in self._contexts:
                self._tokens[out.request_id] = self._tokens.get(out.request_id, 0) + len(out.new_token_ids)
                if out.finished:
                    self._leaving.add(out.request_id)

    def turn_ended(self) -> None:
        if self._tokens:
            self._write_spans(tracing.now_ns())
        for request_id in self._leaving:
            self._contexts.pop(request_id, None)
            self._joined_ns.pop(request_id, None)
        self._leaving.clear()

    def _write_spans(self, ended_ns: int) -> None:
        tracer = tracing.tracer()
        batch = len(self._tokens)
        for request_id, tokens in self._tokens.items():
            joined = self._joined_ns.get(request_id, 0)
            switched = self._switch is not None and joined <= self._switch.started_ns
            turn = tracer.start_span(self.turn_span_name, context=self._contexts[request_id],
                                     start_time=max(self._started_ns, joined), attributes={
                                         "model": self._model, "tokens": tokens, "steps": self._steps,
                                         "batch_size": batch, "switched": switched})
            if switched:
                self._switch_span(tracer, turn, self._switch)
            turn.end(end_time=ended_ns)

    @staticmethod
    def _switch_span(tracer: trace.Tracer, turn: trace.Span, s: SwitchRecord) -> None:
        span = tracer.start_span("model.switch", context=trace.set_span_in_context(turn),
                                 start_time=s.started_ns, attributes={
                                     "model": s.incoming, "from_model": s.outgoing or "",
                                     "weight_bytes": s.weight_bytes, "seconds": s.seconds,
                                     "prefetched": s.prefetched, "kv_swapped_out": s.kv_out,
                                     "kv_swapped_in": s.kv_in})
        span.end(end_time=s.started_ns + int(s.seconds * 1e9))
