"""Telemetry's pure parts: the attainment window, the proxy's token accounting, turn spans."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from tokenpool.engine.multi_model_engine import SwitchRecord
from tokenpool.engine.request_book import RequestOutput
from tokenpool.telemetry import tracing
from tokenpool.telemetry.attainment_window import AttainmentWindow
from tokenpool.telemetry.proxy_metrics import ProxyMetrics
from tokenpool.telemetry.turn_tracer import TurnTracer


def test_the_attainment_window_forgets_what_ended_before_it():
    now = [0.0]
    window = AttainmentWindow(10.0, clock=lambda: now[0])
    window.add("a", 1.0)
    now[0] = 6.0
    window.add("a", 0.5)
    window.add("b", 0.0)
    assert window.means() == {"a": (0.75, 2), "b": (0.0, 1)}
    now[0] = 12.0
    assert window.means() == {"a": (0.5, 1), "b": (0.0, 1)}
    with pytest.raises(ValueError, match="1.5"):
        window.add("a", 1.5)


def test_a_chunk_of_tokens_counts_each_token_between_tokens():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, ["m"])
    request = metrics.admitted("m", arrival=0.0)
    request.tokens(1, now=0.5)  # the first token: TTFT 0.5
    request.tokens(3, now=0.8)  # three tokens arriving together: three gaps of 0.1
    request.ended("finished")
    request.ended("finished")  # counted once
    value = registry.get_sample_value
    assert value("tokenpool_ttft_seconds_count", {"model": "m"}) == 1
    assert value("tokenpool_ttft_seconds_sum", {"model": "m"}) == pytest.approx(0.5)
    assert value("tokenpool_tbt_seconds_count", {"model": "m"}) == 3
    assert value("tokenpool_tbt_seconds_sum", {"model": "m"}) == pytest.approx(0.3)
    assert value("tokenpool_requests_total", {"model": "m", "outcome": "finished"}) == 1
    assert value("tokenpool_requests_in_flight", {"model": "m"}) == 0
    metrics.rejected("not-served")
    assert value("tokenpool_requests_total", {"model": "unknown", "outcome": "rejected"}) == 1


def out(request_id: str, tokens: list[int], finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id, tokens, "", finished, None, 4, len(tokens))


def test_turn_spans_per_request_with_the_switch_under_each(monkeypatch):
    provider, exporter = TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "ENABLED", True)
    decode = provider.get_tracer("test").start_span("Decode")
    turns = TurnTracer("decode.turn")
    turns.begin("a", trace.set_span_in_context(decode))
    turns.begin("b", trace.set_span_in_context(decode))
    turns.begin("untraced", None)

    turns.turn_started()
    turns.switched(SwitchRecord("x", "m", 1000, True, 2, 1, tracing.now_ns(), 0.01))
    turns.stepped("m", [out("a", [1]), out("b", [2]), out("untraced", [3])])
    turns.stepped("m", [out("a", [4], finished=True), out("b", [5])])
    turns.turn_ended()
    spans = exporter.get_finished_spans()
    assert sorted(s.attributes["tokens"] for s in spans if s.name == "decode.turn") == [2, 2]
    switches = [s for s in spans if s.name == "model.switch"]
    assert len(switches) == 2 and all(s.attributes["weight_bytes"] == 1000 for s in switches)
    turn_ids = {s.context.span_id for s in spans if s.name == "decode.turn"}
    assert {s.parent.span_id for s in switches} == turn_ids
    assert all(s.parent.span_id == decode.context.span_id for s in spans if s.name == "decode.turn")

    exporter.clear()
    turns.turn_started()  # a finished, b goes on; no switch this turn
    turns.stepped("m", [out("a", [6]), out("b", [7])])
    turns.turn_ended()
    spans = exporter.get_finished_spans()
    assert [(s.name, s.attributes["tokens"]) for s in spans] == [("decode.turn", 1)]
