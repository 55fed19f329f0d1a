"""Choices: the Generate calls of one OpenAI request (one per choice), read together.

start() waits for every call's first message, so what the proxy refuses (unknown model,
bad value, full table, no instance) becomes the HTTP status before any byte is sent.
events() then merges the calls through a queue of a few messages: a client that stops
reading stops the reads, and gRPC's flow control stops the proxy, so nothing grows
without bound here. cancel() cancels every call (the proxy frees their KV).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from tokenpool.protos.v1 import inference_pb2 as pb

from .errors import APIError, from_rpc_error
from .proxy_client import ProxyClient

QUEUE_PER_CALL = 2  # messages buffered per call while the client is slower than the model


@dataclass(frozen=True)
class ChoiceEvent:
    """A message of choice `index`; error set instead when its call failed mid-way."""

    index: int
    response: pb.GenerateResponse | None = None
    error: APIError | None = None


class Choices:
    def __init__(self, client: ProxyClient, requests: list[pb.GenerateRequest], metadata: tuple,
                 retry_after_s: int) -> None:
        self.calls = [client.generate(r, metadata) for r in requests]
        self.retry_after_s = retry_after_s
        self.first: list[pb.GenerateResponse] = []
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Every call's first message; APIError (every call cancelled) when one is refused."""
        firsts = await asyncio.gather(*(c.read() for c in self.calls), return_exceptions=True)
        for first in firsts:
            if isinstance(first, BaseException) or first is grpc.aio.EOF:
                self.cancel()
                raise self._error(first)
        self.first = list(firsts)

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """The first messages, then the rest as they come, until every call has ended."""
        for i, first in enumerate(self.first):
            yield ChoiceEvent(i, first)
        queue: asyncio.Queue = asyncio.Queue(QUEUE_PER_CALL * len(self.calls))
        live = [i for i, r in enumerate(self.first) if not r.finish_reason]
        self._tasks = [asyncio.create_task(self._pump(i, queue)) for i in live]
        remaining = len(live)
        while remaining:
            event = await queue.get()
            if event is None:
                remaining -= 1
                continue
            yield event

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        for call in self.calls:
            call.cancel()

    async def _pump(self, index: int, queue: asyncio.Queue) -> None:
        call = self.calls[index]
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                await queue.put(ChoiceEvent(index, response))
                if response.finish_reason:
                    break
        except grpc.aio.AioRpcError as exc:
            await queue.put(ChoiceEvent(index, error=self._error(exc)))
        await queue.put(None)

    def _error(self, outcome) -> APIError:
        if isinstance(outcome, grpc.aio.AioRpcError):
            return from_rpc_error(outcome, self.retry_after_s)
        if isinstance(outcome, BaseException):
            return APIError(502, f"the proxy call failed: {outcome!r}")
        return APIError(502, "the proxy ended the stream before any token")
