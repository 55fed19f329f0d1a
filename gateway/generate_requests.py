"""An OpenAI request -> the proxy's GenerateRequests: one per choice (n) and prompt.

Chat messages, all of them, go through the model's chat template at the proxy (its Tokenize
RPC: chat_tokenize_request) and reach Generate as token ids, so the n choices share one
templating. Completion prompts go as they came, text or ids (the proxy encodes text as its
Tokenize would). Choice i of a seeded request samples with seed + i, so n choices differ and
each is reproducible.
"""

from __future__ import annotations

from tokenpool.engine.sampling_params import MAX_LOGIT_BIAS_TOKENS
from tokenpool.protos.v1 import inference_pb2 as pb

from .config import GatewayConfig
from .errors import bad_field
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, Sampling

DEFAULT_TEMPERATURE = 1.0  # OpenAI's (the gRPC API's default is greedy)


def chat_tokenize_request(body: ChatCompletionRequest, config: GatewayConfig) -> pb.TokenizeRequest:
    """The request's conversation for the proxy's chat template, once its limits are checked."""
    check_limits(body, config)
    return tokenize_messages(body.model, body.messages)


def tokenize_messages(model: str, messages: list[ChatMessage]) -> pb.TokenizeRequest:
    """Every message for the model's chat template, with the generation prompt."""
    if not messages:
        raise bad_field("messages", "messages is empty: give at least one message")
    turns = [pb.ChatMessage(role=m.role, content=m.text()) for m in messages]
    return pb.TokenizeRequest(model=model, chat=pb.ChatMessages(messages=turns))


def chat_requests(body: ChatCompletionRequest, ids: list[int]) -> list:
    """n requests for the templated conversation's ids (chat_tokenize_request checked the body)."""
    return [_request(body, ids, i, body.token_limit, body.num_logprobs) for i in range(body.n)]


def completion_requests(body: CompletionRequest, config: GatewayConfig) -> list:
    """len(prompts) * n requests, prompt-major (choice index = prompt index * n + i)."""
    check_limits(body, config)
    if body.echo and body.num_logprobs is not None:
        raise bad_field("echo", "echo with logprobs is not supported: the engine computes no "
                                "log-probabilities of prompt tokens")
    prompts = prompt_list(body.prompt)
    if len(prompts) * body.n > config.max_n:
        raise bad_field("n", f"{len(prompts)} prompts x n={body.n} choices exceed the limit of "
                             f"{config.max_n}")
    for p in prompts:
        if not p:
            raise bad_field("prompt", "prompt is empty")
    return [_request(body, p, i, body.token_limit, body.num_logprobs) for p in prompts for i in range(body.n)]


def check_limits(body: Sampling, config: GatewayConfig) -> None:
    unsupported(body)
    if body.n > config.max_n:
        raise bad_field("n", f"n={body.n} exceeds the limit of {config.max_n} choices")
    stops = body.stop_list
    if len(stops) > config.max_stop:
        raise bad_field("stop", f"{len(stops)} stop strings exceed the limit of {config.max_stop}")
    if any(not s for s in stops):
        raise bad_field("stop", "stop strings must not be empty")
    logit_bias(body)


def unsupported(body: Sampling) -> None:
    """400 naming a field whose request tokenpool cannot honour, rather than an answer that
    silently ignores it: structured output (response_format other than text) and tool calls."""
    kind = (body.response_format or {}).get("type", "text")
    if kind != "text":
        raise bad_field("response_format", f"response_format {kind!r} is not supported: tokenpool has no "
                                           f"guided decoding; ask for JSON in the prompt instead")
    choice = getattr(body, "tool_choice", None)
    if getattr(body, "tools", None) and choice != "none":
        raise bad_field("tool_choice", f"tool calls are not supported (tools given with tool_choice "
                                       f"{choice or 'auto'!r}): tokenpool has no tool-call parser; send "
                                       f"tool_choice \"none\" or no tools")
    if choice not in (None, "none", "auto") and not getattr(body, "tools", None):
        raise bad_field("tool_choice", f"tool_choice {choice!r} needs tools (and tool calls are not "
                                       f"supported)")


def logit_bias(body: Sampling) -> dict[int, float]:
    """The body's logit_bias with integer keys; 400 naming `logit_bias` for a key that is not a
    token id, or too many of them (the proxy checks them against the model's vocabulary)."""
    bias = body.logit_bias or {}
    if len(bias) > MAX_LOGIT_BIAS_TOKENS:
        raise bad_field("logit_bias", f"logit_bias has {len(bias)} tokens; the limit is "
                                      f"{MAX_LOGIT_BIAS_TOKENS}")
    bad = [k for k in bias if not (k.isascii() and k.isdigit() and int(k) < 2**32)]
    if bad:
        raise bad_field("logit_bias", f"logit_bias keys must be token ids, got {bad[0]!r}")
    return {int(k): v for k, v in bias.items()}


def prompt_list(prompt) -> list[str | list[int]]:
    """A string, token ids, or a non-empty list of either; 400 naming `prompt` otherwise."""
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        return list(prompt)
    raise bad_field("prompt", "prompt must be a string, a list of token ids, or a non-empty list of either")


def _is_ids(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in value))


def _request(body: Sampling, prompt: str | list[int], index: int, max_tokens: int | None,
             logprobs: int | None) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(top_k=max(body.top_k or 0, 0), stop=body.stop_list,
                                 ignore_eos=body.ignore_eos)
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", body.top_p), ("logprobs", logprobs),
                        ("presence_penalty", body.presence_penalty or None),
                        ("frequency_penalty", body.frequency_penalty or None)):
        if value is not None:
            setattr(sampling, name, value)
    sampling.logit_bias.update(logit_bias(body))
    if body.repetition_penalty is not None:
        sampling.repetition_penalty = body.repetition_penalty
    if body.seed is not None:
        sampling.seed = (body.seed + index) % 2**63
    if isinstance(prompt, str):
        return pb.GenerateRequest(model=body.model, text=prompt, sampling=sampling)
    return pb.GenerateRequest(model=body.model, token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
