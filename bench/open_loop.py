"""open_loop: the serving benchmark's replay of a trace, whatever API carries the requests.

Each request is sent at its arrival time (open loop: a slow stack does not slow the arrivals)
by a `stream` function that returns its tokens' arrival times; requests for models the stack
does not serve score 0, and so do requests still running at the drain deadline (duration x
(1 + drain_factor)), which `stream` gets as its timeout. Progress goes to stderr every 2 s.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

from .metrics import RequestResult
from .workload import TraceRequest

PROGRESS_S = 2.0

# stream(request, timeout_s, now) -> (each token's arrival, finished); now() is seconds since
# the replay started, the clock the token times are on.
Stream = Callable[[TraceRequest, float, Callable[[], float]], Awaitable[tuple[list[float], bool]]]


async def open_loop(trace: list[TraceRequest], served: set[str], duration: float, drain_factor: float,
                    label: str, stream: Stream) -> list[RequestResult]:
    start = time.monotonic()
    deadline = duration * (1 + drain_factor)
    done = [0]

    def now() -> float:
        return time.monotonic() - start

    async def one(request: TraceRequest) -> RequestResult:
        await asyncio.sleep(max(0.0, request.arrival_s - now()))
        if request.model not in served:
            return RequestResult(request.arrival_s, [], finished=False)
        times, finished = await stream(request, max(1.0, deadline - request.arrival_s), now)
        done[0] += 1
        return RequestResult(request.arrival_s, times, finished)

    async def progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_S)
            sent = sum(1 for r in trace if r.arrival_s <= now())
            print(f"{label}: {sent}/{len(trace)} sent, {done[0]} done", file=sys.stderr, flush=True)

    reporter = asyncio.create_task(progress())
    try:
        return list(await asyncio.gather(*(one(r) for r in trace)))
    finally:
        reporter.cancel()
