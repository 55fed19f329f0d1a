"""W3C trace context across gRPC: a server interceptor that opens a span per call under the
caller's context (read from the `traceparent` metadata), and client interceptors that put
the current context into every outgoing call's metadata.

    server = grpc.aio.server(interceptors=server_interceptors(roots=True))   # the proxy
    channel = aio_channel("127.0.0.1:7001")                                  # proxy -> instance
    stub = KVTransferStub(intercept(grpc.insecure_channel(address)))         # engine thread -> agent

Only the front door (roots=True: the proxy) starts a trace for a call that carries none, and
honours one a client sends. Internal services trace only calls made inside a request's trace,
so a status poll or a sweep never opens a trace of its own. Health and reflection calls are
never traced. All three helpers install nothing while tracing is off.
"""

from __future__ import annotations

import asyncio
from collections import namedtuple
from contextlib import contextmanager

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from tokenpool.cli import internal_tls
from tokenpool.cli.internal_token import internal_token
from tokenpool.cli.internal_token import metadata as internal_metadata

from . import tracing

UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def server_interceptors(roots: bool) -> list[grpc.aio.ServerInterceptor]:
    return [TracingServerInterceptor(roots)] if tracing.enabled() else []


def aio_channel(address: str, options=None) -> grpc.aio.Channel:
    """A channel for calls between services (mutual TLS when configured: cli/internal_tls.py): each
    call carries the current trace context when tracing is on, and the internal token when one is
    configured."""
    interceptors = [_AioUnaryInterceptor(), _AioStreamInterceptor()] if _decorating() else None
    return internal_tls.aio_channel(address, options=options, interceptors=interceptors)


def intercept(channel: grpc.Channel) -> grpc.Channel:
    """A blocking channel whose calls carry the trace context and internal token, as aio_channel's."""
    return grpc.intercept_channel(channel, _SyncClientInterceptor()) if _decorating() else channel


def _decorating() -> bool:
    return tracing.enabled() or internal_token() is not None


class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, roots: bool) -> None:
        self.roots = roots

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNTRACED_PREFIXES):
            return handler
        parent = propagate.extract(dict(handler_call_details.invocation_metadata or ()))
        if not self.roots and not trace.get_current_span(parent).get_span_context().is_valid:
            return handler
        return _traced_handler(handler, method, parent)


def _traced_handler(handler, method: str, parent):
    """The handler with its behaviour run inside a server span (unary and server-streaming calls;
    tokenpool has no client-streaming ones)."""
    if handler.unary_unary is not None:
        behaviour = handler.unary_unary

        async def unary(request, context):
            with _server_span(method, parent, context):
                return await behaviour(request, context)
        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream is not None:
        behaviour = handler.unary_stream

        async def unary_stream(request, context):
            with _server_span(method, parent, context):
                async for response in behaviour(request, context):
                    yield response
        return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    return handler


@contextmanager
def _server_span(method: str, parent, context):
    service, _, name = method.lstrip("/").rpartition("/")
    with tracing.tracer().start_as_current_span(
            method.lstrip("/"), context=parent, kind=SpanKind.SERVER, record_exception=False,
            set_status_on_exception=False,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}) as span:
        try:
            yield span
        except asyncio.CancelledError:
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
            raise
        except BaseException as exc:
            code = _code(context) or grpc.StatusCode.UNKNOWN
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_status(Status(StatusCode.ERROR, _details(context) or f"{code.name}: {exc}"))
            raise
        else:
            span.set_attribute("rpc.grpc.status_code", (_code(context) or grpc.StatusCode.OK).value[0])


def _code(context) -> grpc.StatusCode | None:
    try:
        return context.code()
    except Exception:  # noqa: BLE001 - a context without code(): the status is unknown, not fatal
        return None


def _details(context) -> str | None:
    try:
        return context.details()
    except Exception:  # noqa: BLE001
        return None


def _carrier() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


# Two classes: grpc.aio files an interceptor under the first kind it is an instance of, only.
class _AioUnaryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_aio_details(client_call_details), request)


class _AioStreamInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_aio_details(client_call_details), request)


def _outgoing() -> list[tuple[str, str]]:
    """Metadata every call between services adds: the trace context and the internal token."""
    return [*_carrier().items(), *internal_metadata()]


def _aio_details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    extra = _outgoing()
    if not extra:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in extra:
        metadata.add(key, value)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class _CallDetails(namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _SyncClientInterceptor(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(self, continuation, client_call_details, request):
        extra = _outgoing()
        if extra:
            d = client_call_details
            metadata = [*(d.metadata or ()), *extra]
            client_call_details = _CallDetails(d.method, d.timeout, metadata, d.credentials,
                                               getattr(d, "wait_for_ready", None),
                                               getattr(d, "compression", None))
        return continuation(client_call_details, request)
