"""replay_http: the serving benchmark's open-loop replay over the OpenAI-compatible HTTP API
(`tokenpool bench serve --api http`), with the official `openai` client, so the gateway's cost
shows beside the gRPC replay's in the same report.

Each streamed chunk is one proxy message; its tokens are counted from the final usage block
(stream_options.include_usage): a chunk counts one token, and tokens the chunks did not account
for (a message carrying several) get the last chunk's time, as the gRPC replay times a message's
tokens together.
"""

from __future__ import annotations

import sys

from .metrics import RequestResult
from .open_loop import open_loop
from .workload import TraceRequest


async def replay_http(base_url: str, trace: list[TraceRequest], served: set[str], duration: float,
                      label: str, drain_factor: float) -> list[RequestResult]:
    """The trace over the HTTP API (bench/open_loop.py: arrivals, scoring, progress)."""
    try:
        import openai
    except ImportError:
        raise ValueError("--api http needs the openai package (pip install openai)") from None
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    try:
        return await open_loop(trace, served, duration, drain_factor, label,
                               lambda request, timeout, now: _stream(client, request, now, timeout))
    finally:
        await client.close()


async def _stream(client, request: TraceRequest, now, timeout: float) -> tuple[list[float], bool]:
    import openai

    times: list[float] = []
    finished, total = False, None
    try:
        stream = await client.completions.create(
            model=request.model, prompt=request.prompt, max_tokens=request.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            timeout=timeout)
        async for chunk in stream:
            if chunk.choices:
                times.append(now())
                finished = finished or chunk.choices[0].finish_reason is not None
            if chunk.usage is not None:
                total = chunk.usage.completion_tokens
    except (TimeoutError, openai.APIError) as exc:
        print(f"{request.request_id}: {exc!r}", file=sys.stderr, flush=True)
        return times, False
    if total is not None and times and total > len(times):
        times += [times[-1]] * (total - len(times))
    return times, finished
