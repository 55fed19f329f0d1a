"""APIError: a request's failure in OpenAI's JSON error shape, with its HTTP status.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

gRPC statuses from the proxy map to the codes OpenAI clients act on: NOT_FOUND 404,
INVALID_ARGUMENT / OUT_OF_RANGE 400, RESOURCE_EXHAUSTED 429 (with Retry-After: the
client library retries it), UNAVAILABLE 503, UNAUTHENTICATED 401, DEADLINE_EXCEEDED 504.
"""

from __future__ import annotations

import re

import grpc
from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_exceeded", 499: "cancelled",
          503: "service_unavailable", 504: "timeout"}
_FROM_GRPC = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400,
              grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.ALREADY_EXISTS: 400,
              grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
              grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 401,
              grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499}


class APIError(Exception):
    """A failure the client gets as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else None
        return JSONResponse(self.body, status_code=self.status, headers=headers)


def bad_field(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def from_rpc_error(exc: grpc.aio.AioRpcError, retry_after_s: int) -> APIError:
    """The proxy's status as the HTTP error an OpenAI client expects."""
    status = _FROM_GRPC.get(exc.code(), 500)
    message = exc.details() or exc.code().name
    if status == 404:
        return APIError(404, message, param="model", code="model_not_found")
    if status == 429:
        return APIError(429, message, code="table_full", retry_after_s=_retry_after(exc, retry_after_s))
    return APIError(status, message, param=_sampling_field(message) if status == 400 else None,
                    code=exc.code().name.lower())


def _sampling_field(message: str) -> str | None:
    """The OpenAI field a proxy refusal names ('sampling.max_tokens=5000 exceeds ...': max_tokens)."""
    match = re.match(r"sampling\.([a-z_]+)\b", message)
    return match.group(1) if match else None


def _retry_after(exc: grpc.aio.AioRpcError, default_s: int) -> int:
    """Whole seconds from the proxy's retry-after-ms trailer (at least 1), else the default."""
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms" and str(value).isdigit():
            return max(1, -(-int(value) // 1000))
    return default_s
