"""replay_http: the serving benchmark's open-loop replay over the OpenAI-compatible HTTP API
(`tokenpool bench serve --api http`), with the official `openai` client, so the gateway's cost
shows beside the gRPC replay's in the same report.

Each streamed chunk is one proxy message; its tokens are counted from the final usage block
(stream_options.include_usage): a chunk counts one token, and tokens the chunks did not account
for (a message carrying several) get the last chunk's time, as the gRPC replay times a message's
tokens together.
"""

from __future__ import annotations

import asyncio
import sys
import time

from .metrics import RequestResult
from .workload import TraceRequest


async def replay_http(base_url: str, trace: list[TraceRequest], served: set[str], duration: float,
                      label: str, drain_factor: float) -> list[RequestResult]:
    """As serve_bench.replay: open loop; requests still running after duration x (1 + drain_factor),
    or for models the stack does not serve, score 0."""
    try:
        import openai
    except ImportError:
        raise ValueError("--api http needs the openai package (pip install openai)") from None
    start = time.monotonic()
    deadline = duration * (1 + drain_factor)
    done = [0]
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)

    async def one(request: TraceRequest) -> RequestResult:
        await asyncio.sleep(max(0.0, request.arrival_s - (time.monotonic() - start)))
        if request.model not in served:
            return RequestResult(request.arrival_s, [], finished=False)
        times, finished = await _stream(client, request, start, max(1.0, deadline - request.arrival_s))
        done[0] += 1
        return RequestResult(request.arrival_s, times, finished)

    async def progress() -> None:
        while True:
            await asyncio.sleep(2.0)
            sent = sum(1 for r in trace if r.arrival_s <= time.monotonic() - start)
            print(f"{label}: {sent}/{len(trace)} sent, {done[0]} done", file=sys.stderr, flush=True)

    reporter = asyncio.create_task(progress())
    try:
        return list(await asyncio.gather(*(one(r) for r in trace)))
    finally:
        reporter.cancel()
        await client.close()


async def _stream(client, request: TraceRequest, start: float, timeout: float) -> tuple[list[float], bool]:
    import openai

    times: list[float] = []
    finished, total = False, None
    try:
        stream = await client.completions.create(
            model=request.model, prompt=request.prompt, max_tokens=request.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            timeout=timeout)
        async for chunk in stream:
            now = time.monotonic() - start
            if chunk.choices:
                times.append(now)
                finished = finished or chunk.choices[0].finish_reason is not None
            if chunk.usage is not None:
                total = chunk.usage.completion_tokens
    except (TimeoutError, openai.APIError) as exc:
        print(f"{request.request_id}: {exc!r}", file=sys.stderr, flush=True)
        return times, False
    if total is not None and times and total > len(times):
        times += [times[-1]] * (total - len(times))
    return times, finished
