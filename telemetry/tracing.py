"""Tracing for one service process, configured from the standard OTEL_* environment variables.

    configure("prefill-0")      # in run_service, before the service starts
    with span("proxy.prefill", instance="prefill-0"):      # a child of the current span
        ...
    ctx = capture()              # on the event loop: the request's context, for the engine thread
    with child_span(ctx, "kv.publish", bytes=n):           # on the engine thread
        ...

Tracing is on when OTEL_TRACES_EXPORTER names an exporter (otlp, console), or when an OTLP
endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) and
OTEL_TRACES_EXPORTER is not "none"; OTEL_SDK_DISABLED=true turns it off. The SDK reads the
rest itself: OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* (batching), OTEL_EXPORTER_OTLP_* (endpoint,
headers, timeout, insecure), OTEL_RESOURCE_ATTRIBUTES, OTEL_PROPAGATORS.

Off, nothing is installed: no SDK provider, no exporter, no interceptors (start_grpc_server
asks enabled()), and every helper here returns after one flag test.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace

log = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console", "none")
SHUTDOWN_TIMEOUT_S = 3.0  # a collector that is down must not hold up a service's exit
_state = {"provider": None}
_tracer: trace.Tracer = trace.NoOpTracer()
ENABLED = False  # read by hot paths; set by configure() only


def wanted(env: Mapping[str, str] = os.environ) -> str | None:
    """The exporter the OTEL_* variables ask for ('otlp', 'console'), or None: tracing off.
    ValueError naming the variable for an exporter or protocol this build cannot serve."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not names:
        names = ["otlp"] if endpoint else []
    names = [n for n in names if n != "none"]
    if not names:
        return None
    if len(names) > 1 or names[0] not in EXPORTERS:
        raise ValueError(f"OTEL_TRACES_EXPORTER={env.get('OTEL_TRACES_EXPORTER')!r}: expected one of "
                         f"{', '.join(EXPORTERS)}")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc")
    if names[0] == "otlp" and protocol != "grpc":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only 'grpc' is supported (port 4317)")
    return names[0]


def configure(service_name: str, env: Mapping[str, str] = os.environ) -> bool:
    """Install a TracerProvider exporting this process's spans, if the environment asks for one.

    service.name is OTEL_SERVICE_NAME when set, else service_name; service.instance.id is
    service_name. -> whether tracing is on.
    """
    global _tracer, ENABLED
    exporter_name = wanted(env)
    if exporter_name is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name,
                                "service.instance.id": service_name, "service.namespace": "tokenpool"})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # shutdown() flushes, bounded
    provider.add_span_processor(BatchSpanProcessor(_exporter(exporter_name)))
    trace.set_tracer_provider(provider)
    _state["provider"] = provider
    _tracer = provider.get_tracer("tokenpool")
    ENABLED = True
    return True


def _exporter(name: str):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def shutdown() -> None:
    """Flush what is buffered and stop exporting; gives up after SHUTDOWN_TIMEOUT_S."""
    provider = _state["provider"]
    if provider is None:
        return
    _state["provider"] = None
    done = threading.Thread(target=provider.shutdown, name="trace-shutdown", daemon=True)
    done.start()
    done.join(SHUTDOWN_TIMEOUT_S)
    if done.is_alive():
        log.warning("traces not flushed within %.0f s (is the collector up?); dropping them",
                    SHUTDOWN_TIMEOUT_S)


def enabled() -> bool:
    return ENABLED


def tracer() -> trace.Tracer:
    return _tracer


def capture() -> otel_context.Context | None:
    """The current context (to carry a request's trace onto another thread); None when off."""
    return otel_context.get_current() if ENABLED else None


@contextmanager
def span(name: str, **attributes) -> Iterator[trace.Span | None]:
    """A span, current inside the block, child of the current span (event-loop code); none when
    there is no current span (a call outside any request's trace starts no trace of its own)."""
    if not ENABLED or not trace.get_current_span().get_span_context().is_valid:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as s:
        yield s


@contextmanager
def child_span(parent: otel_context.Context | None, name: str, **attributes) -> Iterator[trace.Span | None]:
    """A span under a captured context, current inside the block (so calls made in it carry
    it); none when parent is None (tracing off, or a request that came without a trace)."""
    if parent is None or not ENABLED:
        yield None
        return
    with _tracer.start_as_current_span(name, context=parent, attributes=attributes) as s:
        yield s


def start_child(parent: otel_context.Context | None, name: str, start_ns: int | None = None,
                **attributes) -> trace.Span | None:
    """A span under a captured context that the caller ends (span.end()); None when parent is None."""
    if parent is None or not ENABLED:
        return None
    return _tracer.start_span(name, context=parent, attributes=attributes, start_time=start_ns)


@contextmanager
def within(span: trace.Span | None) -> Iterator[None]:
    """span current inside the block (calls made in it carry it), not ended on exit; no-op for None."""
    if span is None:
        yield
        return
    with trace.use_span(span, end_on_exit=False):
        yield


def annotate(**attributes) -> None:
    """Set attributes on the current span (no-op when off)."""
    if ENABLED:
        trace.get_current_span().set_attributes(attributes)


def now_ns() -> int:
    """Span timestamps are wall-clock nanoseconds."""
    return time.time_ns()
