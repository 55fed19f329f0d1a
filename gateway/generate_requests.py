"""An OpenAI request -> the proxy's GenerateRequests: one per choice (n) and prompt.

Chat messages go through the model's chat template here, all of them (the proxy's `chat`
flag templates one user message), and reach the proxy as token ids. Choice i of a seeded
request samples with seed + i, so n choices differ and each is reproducible.
"""

from __future__ import annotations

from tokenpool.engine.errors import ModelFolderError
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.proxy.served_model import ServedModel

from .config import GatewayConfig
from .errors import APIError, bad_field
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, Sampling

DEFAULT_TEMPERATURE = 1.0  # OpenAI's (the gRPC API's default is greedy)


def served(models: dict[str, ServedModel], model: str) -> ServedModel:
    found = models.get(model)
    if found is None:
        raise APIError(404, f"model {model!r} is not served here; models: {', '.join(sorted(models))}",
                       param="model", code="model_not_found")
    return found


def chat_requests(body: ChatCompletionRequest, model: ServedModel, config: GatewayConfig) -> list:
    check_limits(body, config)
    if not body.messages:
        raise bad_field("messages", "messages is empty: give at least one message")
    ids = chat_ids(model, body.messages)
    return [_request(body, ids, i, body.token_limit, body.num_logprobs) for i in range(body.n)]


def completion_requests(body: CompletionRequest, model: ServedModel, config: GatewayConfig) -> list:
    """len(prompts) * n requests, prompt-major (choice index = prompt index * n + i)."""
    check_limits(body, config)
    if body.echo:
        raise bad_field("echo", "echo is not supported")
    prompts = prompt_list(body.prompt)
    if len(prompts) * body.n > config.max_n:
        raise bad_field("n", f"{len(prompts)} prompts x n={body.n} choices exceed the limit of "
                             f"{config.max_n}")
    return [_request(body, _prompt_ids(model, p), i, body.token_limit, body.num_logprobs)
            for p in prompts for i in range(body.n)]


def check_limits(body: Sampling, config: GatewayConfig) -> None:
    if body.n > config.max_n:
        raise bad_field("n", f"n={body.n} exceeds the limit of {config.max_n} choices")
    stops = body.stop_list
    if len(stops) > config.max_stop:
        raise bad_field("stop", f"{len(stops)} stop strings exceed the limit of {config.max_stop}")
    if any(not s for s in stops):
        raise bad_field("stop", "stop strings must not be empty")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise bad_field(name, f"{name} is not supported (only 0)")


def chat_ids(model: ServedModel, messages: list[ChatMessage]) -> list[int]:
    """Every message through the model's chat template, with the generation prompt."""
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return model.tokenizer.encode_chat(turns)
    except (ModelFolderError, ValueError) as exc:
        raise bad_field("messages", f"{model.id}: {exc}") from None


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


def _prompt_ids(model: ServedModel, prompt: str | list[int]) -> list[int]:
    ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    if not ids:
        raise bad_field("prompt", "prompt is empty")
    return ids


def _request(body: Sampling, ids: list[int], index: int, max_tokens: int | None,
             logprobs: int | None) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(top_k=max(body.top_k or 0, 0), stop=body.stop_list,
                                 ignore_eos=body.ignore_eos)
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", body.top_p), ("logprobs", logprobs)):
        if value is not None:
            setattr(sampling, name, value)
    if body.seed is not None:
        sampling.seed = (body.seed + index) % 2**63
    return pb.GenerateRequest(model=body.model, token_ids=pb.TokenIds(ids=ids), sampling=sampling)
