"""The OpenAI response objects: whole completions, stream chunks, usage and logprobs.

    chat:        chat.completion / chat.completion.chunk, message.content / delta.content
    completions: text_completion (whole and chunks), choices[].text
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from tokenpool.protos.v1 import inference_pb2 as pb

FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_ABORT: "abort"}


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, response: pb.GenerateResponse) -> None:
        self.text.append(response.text)
        self.token_ids += response.token_ids
        self.logprobs += response.logprobs
        if response.finish_reason:
            self.finish_reason = FINISH[response.finish_reason]
            self.prompt_tokens = response.usage.prompt_tokens
            self.completion_tokens = response.usage.completion_tokens


class ResponseBuilder:
    """Builds one request's response objects. chat: chat completions, else text completions."""

    def __init__(self, chat: bool, model: str, want_logprobs: bool, n: int = 1,
                 echo: list[str] | None = None) -> None:
        self.chat = chat
        self.n = n  # choices per prompt: they share one prompt in the usage
        self.echo = echo  # completions with echo: each choice's prompt text, put before its text
        self.model = model
        self.want_logprobs = want_logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    # -- whole responses --------------------------------------------------------------

    def completion(self, choices: list[ChoiceState]) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [self._choice(i, c) for i, c in enumerate(choices)],
                "usage": usage(choices, self.n)}

    def _choice(self, index: int, state: ChoiceState) -> dict:
        text = "".join(state.text)
        logprobs = self.logprobs(state.logprobs)
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs, "finish_reason": state.finish_reason}
        return {"index": index, "text": self._echoed(index, True) + text, "logprobs": logprobs,
                "finish_reason": state.finish_reason}

    # -- stream chunks -------------------------------------------------------------------

    def chunk(self, index: int, response: pb.GenerateResponse, first: bool, include_usage: bool) -> dict:
        finish = FINISH.get(response.finish_reason)
        logprobs = self.logprobs(response.logprobs)
        if self.chat:
            delta = {"role": "assistant", "content": response.text} if first else {"content": response.text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            text = self._echoed(index, first) + response.text
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [choice], **({"usage": None} if include_usage else {})}

    def _echoed(self, index: int, first: bool) -> str:
        """The prompt a completion choice starts with (echo), in its whole text or first chunk."""
        return self.echo[index] if self.echo is not None and first else ""

    def usage_chunk(self, choices: list[ChoiceState]) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": usage(choices, self.n)}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    # -- logprobs (token texts come from the proxy, in the messages themselves) --------------

    def logprobs(self, logprobs: list[pb.TokenLogprobs]) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": [_chat_entry(lp) for lp in logprobs]}
        tokens = [lp.token for lp in logprobs]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{c.token: c.logprob for c in lp.top} for lp in logprobs],
                "text_offset": _offsets(tokens)}


def _chat_entry(lp: pb.TokenLogprobs) -> dict:
    top = [_candidate(c.token, c.logprob) for c in lp.top]
    return {**_candidate(lp.token, lp.logprob), "top_logprobs": top}


def _candidate(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def usage(choices: list[ChoiceState], n: int) -> dict:
    """Prompt tokens once per prompt (its n choices share it), completion tokens of every choice."""
    prompt = sum(c.prompt_tokens for c in choices[::n])
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _offsets(tokens: list[str]) -> list[int]:
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return offsets
