"""The request bodies the gateway accepts, as msgspec Structs: decoding checks types and
ranges and names the field of the first bad value ("... - at `$.temperature`").

Fields OpenAI defines that tokenpool does not act on (metadata, store, parallel_tool_calls...)
are ignored as vLLM ignores them; those that would change what a client gets back and that
tokenpool cannot honour (a JSON response_format, tools to call) are refused in
generate_requests.py, as vLLM refuses tools without its tool-call parser."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=-1)]  # -1 and 0: no top-k (vLLM's -1)
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]


class StreamOptions(Struct, frozen=True):
    include_usage: bool = False


class ContentPart(Struct, frozen=True):
    type: str
    text: str = ""


class ChatMessage(Struct, frozen=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class Sampling(Struct, frozen=True, kw_only=True):
    """The fields chat and completions share."""

    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: PositiveInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Bias] | None = None  # token id (as a JSON key: a string) -> bias
    repetition_penalty: RepetitionPenalty | None = None  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension: benchmarks fix the output length with it
    response_format: dict | None = None  # only {"type": "text"}: no guided decoding here

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(Sampling, frozen=True, kw_only=True):
    messages: list[ChatMessage]
    tools: list | None = None  # accepted only with tool_choice "none": no tool-call parser here
    tool_choice: str | dict | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token, or None when no log-probabilities were asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling, frozen=True, kw_only=True):
    # A string, token ids, or a list of either (each prompt gets n choices); checked in generate_requests.py.
    prompt: str | list
    logprobs: TopLogprobs | None = None
    echo: bool = False

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default here

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class TokenizeRequest(Struct, frozen=True, kw_only=True):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Struct, frozen=True, kw_only=True):
    model: str
    tokens: list[Annotated[int, Meta(ge=0, lt=2**32)]]


def decode(body: bytes, kind: type[Struct]) -> Struct:
    """The body as `kind`; APIError 400 naming the field (or the JSON error) otherwise."""
    from .errors import APIError

    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise APIError(400, str(exc), param=_field(str(exc)), code="invalid_value") from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None


def _field(message: str) -> str | None:
    """'... - at `$.messages[0].role`' -> 'messages[0].role'; a missing field's own name."""
    if "- at `$." in message:  # a dict's values are at `$.logit_bias[...]`: the field is logit_bias
        return message.rsplit("- at `$.", 1)[1].rstrip("`").replace("[...]", "")
    if message.startswith("Object missing required field `"):
        return message.split("`")[1]
    return None
