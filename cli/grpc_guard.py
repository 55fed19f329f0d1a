"""Malformed requests get INVALID_ARGUMENT, on every service and method.

grpc.aio answers a request body that does not parse as the method's protobuf with UNKNOWN
("Unexpected DecodeError"), the code of a servicer bug. MalformedRequestGuard wraps every
handler's deserializer: bytes that do not parse become a marker, and the handler answers
INVALID_ARGUMENT naming the message type without running any servicer code.
"""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
    def __init__(self, why: str) -> None:
        self.why = why


def _safe(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, ValueError) as exc:  # ValueError: e.g. invalid UTF-8 in a string field
            return _Malformed(str(exc))
    return parse


def _guard_unary(behavior):
    async def guarded(request, context):
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.why}")
        return await behavior(request, context)
    return guarded


def _guard_stream(behavior):
    if not inspect.isasyncgenfunction(behavior):  # a coroutine that writes with context.write
        return _guard_unary(behavior)

    async def guarded(request, context):
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.why}")
        async for response in behavior(request, context):
            yield response
    return guarded


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    """Unary-request methods (all tokenpool and health methods) answer unparsable bodies with
    INVALID_ARGUMENT; streaming-request methods (reflection) are passed through unchanged."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream), _safe(handler.request_deserializer),
                handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(_guard_unary(handler.unary_unary),
                                                   _safe(handler.request_deserializer),
                                                   handler.response_serializer)
