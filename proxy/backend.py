"""Backend: where the proxy's servicer sends validated requests, and how their tokens come back.

Two implementations: LocalBackend (one in-process switching engine, `tokenpool serve`) and
FleetBackend (prefill and decode instances over gRPC, `tokenpool up`). The servicer does
not know which one it talks to.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from tokenpool.engine.sampling_params import SamplingParams


@dataclass
class Submission:
    """One validated request. outputs receives RequestOutput items, then None; or an Exception."""

    request_id: str
    model: str
    prompt: list[int]
    sampling: SamplingParams
    table_slot: int | None = None
    timeout_s: float | None = None  # time left before the client's deadline
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None  # set by submit: where outputs are delivered

    def deliver(self, item) -> None:
        """Thread-safe: queue an output (or None at the end, or an Exception) for the servicer."""
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class BackendFullError(RuntimeError):
    """More requests are in flight than the backend admits; retry later."""


class Backend(ABC):
    @abstractmethod
    async def submit(self, sub: Submission) -> None:
        """Start the request; outputs then flow into sub.outputs. Raises InvalidRequestError
        (the engine refused it) or BackendFullError, having started nothing."""

    @abstractmethod
    def cancel(self, sub: Submission) -> None:
        """Stop the request (client gone, deadline passed) and free its KV wherever it is."""

    async def statuses(self) -> list:
        """Each instance's internal InstanceStatus, where the backend has instances ([] here)."""
        return []

    @abstractmethod
    async def close(self) -> None:
        """Stop serving; requests in flight end with an error."""
