"""Server-sent events of one streamed request: a chunk per proxy message, `data: [DONE]` last.

Each chunk is produced only when the HTTP server asks for the next one, which it does once
the previous one was handed to the socket (uvicorn waits while the transport's buffer is
over its high-water mark): a client that stops reading holds the reads of its gRPC calls,
not a growing buffer. A failure after the headers went out becomes an error event, as vLLM
sends it (OpenAI's clients raise it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from .choices import Choices
from .metrics import RequestTimer
from .responses import ChoiceState, ResponseBuilder

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def sse(choices: Choices, builder: ResponseBuilder, include_usage: bool,
              timers: list[RequestTimer]) -> AsyncIterator[bytes]:
    """The events of a started Choices; cancels its calls however the stream ends."""
    states = [ChoiceState() for _ in choices.calls]
    seen = [False] * len(states)
    outcome = "abort"
    try:
        async for item in choices.events():
            if item.error is not None:
                yield event(item.error.body)
                break
            states[item.index].add(item.response)
            timers[item.index].tokens(len(item.response.token_ids), item.response)
            yield event(builder.chunk(item.index, item.response, not seen[item.index], include_usage))
            seen[item.index] = True
        else:
            outcome = "finished"
            if include_usage:
                yield event(builder.usage_chunk(states))
        yield DONE
    finally:
        choices.cancel()
        for timer, state in zip(timers, states, strict=True):
            timer.ended(state.finish_reason if outcome == "finished" else "abort")
