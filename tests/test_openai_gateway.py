"""The OpenAI-compatible HTTP gateway (gateway/) in front of a real stack, driven by the official
`openai` client: chat and completions, streamed and not, n choices, seeds, stop strings, logprobs,
token-id prompts, and the same text as the gRPC stream for the same greedy request."""

from __future__ import annotations

import re

import grpc
import openai
import pytest
from gateway_helpers import get, post
from stack_helpers import start_tiny_stack, wait_until_idle
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc

MODELS = ("tiny-llama", "tiny-qwen2")
TABLE_SLOTS = 8
CHAT = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def stack(tiny_dir, tmp_path_factory):
    stack = start_tiny_stack(tiny_dir, MODELS, tmp_path_factory.mktemp("gateway-logs"), prefill=1, decode=1,
                             table_slots=TABLE_SLOTS, gateway=True, gateway_port=0)
    yield stack
    codes = stack.stop()
    assert codes and all(code == 0 for _, code in codes), codes


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.gateway_url, api_key="unused", max_retries=0, timeout=240)


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def grpc_text(stub, model, n, **prompt) -> tuple[str, list[pb.GenerateResponse]]:
    request = pb.GenerateRequest(model=model, sampling=pb.SamplingParams(max_tokens=n, temperature=0,
                                                                         ignore_eos=True), **prompt)
    responses = list(stub.Generate(request, timeout=240))
    return "".join(r.text for r in responses), responses


def test_chat_streamed_and_not_equals_the_grpc_stream(client, stub):
    expected, responses = grpc_text(stub, "tiny-llama", 12, text=CHAT[0]["content"], chat=True)
    extra = {"ignore_eos": True}
    whole = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=12, temperature=0,
                                           extra_body=extra)
    assert whole.object == "chat.completion" and whole.model == "tiny-llama"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == responses[-1].usage.prompt_tokens
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=CHAT, max_completion_tokens=12,
                                                 temperature=0, stream=True, extra_body=extra,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_streamed_and_not_with_text_and_token_id_prompts(client, stub, stack):
    expected, _ = grpc_text(stub, "tiny-qwen2", 10, text="Numbers 12345")
    whole = client.completions.create(model="tiny-qwen2", prompt="Numbers 12345", max_tokens=10,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert whole.object == "text_completion" and whole.choices[0].text == expected
    ids = post(stack, "/tokenize", {"model": "tiny-qwen2", "prompt": "Numbers 12345"}).json()["tokens"]
    streamed = client.completions.create(model="tiny-qwen2", prompt=ids, max_tokens=10, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == expected
    back = post(stack, "/detokenize", {"model": "tiny-qwen2", "tokens": ids}).json()["prompt"]
    assert back == "Numbers 12345"


def test_echo_puts_each_prompt_before_its_completion(client, stub, stack):
    """A text prompt comes back as given, token ids as the proxy decodes them; the usage counts the
    generated tokens only."""
    expected, _ = grpc_text(stub, "tiny-qwen2", 6, text="Numbers 12345")
    whole = client.completions.create(model="tiny-qwen2", prompt="Numbers 12345", max_tokens=6, temperature=0,
                                      n=2, echo=True, extra_body={"ignore_eos": True})
    assert [c.text for c in whole.choices] == ["Numbers 12345" + expected] * 2
    assert whole.usage.completion_tokens == 12
    ids = post(stack, "/tokenize", {"model": "tiny-qwen2", "prompt": "Numbers 12345"}).json()["tokens"]
    chunks = list(client.completions.create(model="tiny-qwen2", prompt=ids, max_tokens=6, temperature=0,
                                            echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text.startswith("Numbers 12345")
    assert "".join(c.choices[0].text for c in chunks) == "Numbers 12345" + expected


def test_n_choices_and_seeds_are_reproducible(client):
    def sample(seed):
        r = client.completions.create(model="tiny-llama", prompt="Hi there", max_tokens=12, temperature=0.9,
                                      seed=seed, n=2, extra_body={"ignore_eos": True})
        assert sorted(c.index for c in r.choices) == [0, 1]
        assert r.usage.completion_tokens == 24
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = sample(7)
    assert sample(7) == first, "the same seed gives the same choices"
    assert first[0] != first[1], "choice i samples with seed + i"
    streamed = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=6, n=2, seed=3,
                                              temperature=0.9, stream=True, extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    again = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=6, n=2, seed=3,
                                           temperature=0.9, extra_body={"ignore_eos": True})
    assert [c.message.content for c in sorted(again.choices, key=lambda c: c.index)] == [texts[0], texts[1]]


def test_stop_strings_end_the_text_before_them(client, stub):
    full, _ = grpc_text(stub, "tiny-llama", 24, text="A longer prompt")
    visible = full.strip()
    stop = visible[len(visible) // 2:len(visible) // 2 + 2]
    r = client.completions.create(model="tiny-llama", prompt="A longer prompt", max_tokens=24, temperature=0,
                                  stop=[stop, "never-seen-stop"], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.find(stop)]


def test_logprobs_of_chat_and_completions(client):
    r = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5), "greedy picks the most likely token"
        assert entry.token == entry.top_logprobs[0].token
    c = client.completions.create(model="tiny-qwen2", prompt="Hi there", max_tokens=5, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    plain = client.completions.create(model="tiny-qwen2", prompt="Hi there", max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_models_health_and_metrics(client, stack):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == set(MODELS)
    for m in models.values():
        card = m.model_dump()
        assert card["state"] in ("resident", "host", "disk") and card["max_model_len"] > 0
    assert get(stack, "/health").status == 200
    client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=4, extra_body={"ignore_eos": True})
    metrics = get(stack, "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert re.search(rf'^{name}{{.*model_name="tiny-llama".*}} ', metrics, re.M), name
    assert re.search(r'^vllm:generation_tokens_total{model_name="tiny-llama"} [1-9]', metrics, re.M)
    wait_until_idle(stack)


def test_presence_and_frequency_penalties_reach_the_engine(client, stub):
    """The OpenAI fields map onto the gRPC API's: the gateway's text is the gRPC stream's with the
    same penalties, and not the unpenalized one (the engine's arithmetic: tests/test_sampling.py)."""
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 2.0}
    request = pb.GenerateRequest(model="tiny-llama", text="a b a b a b", sampling=pb.SamplingParams(
        max_tokens=24, temperature=0, ignore_eos=True, **penalties))
    expected = "".join(r.text for r in stub.Generate(request, timeout=240))
    plain, _ = grpc_text(stub, "tiny-llama", 24, text="a b a b a b")
    assert expected != plain
    whole = client.completions.create(model="tiny-llama", prompt="a b a b a b", max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}, **penalties)
    assert whole.choices[0].text == expected


def test_logit_bias_and_repetition_penalty_reach_the_engine(client, stub):
    """OpenAI's logit_bias (string keys) and vLLM's repetition_penalty (extra_body) give the gRPC
    stream's text with the same fields, not the plain one; +100 on one token makes it every pick."""
    plain, responses = grpc_text(stub, "tiny-llama", 12, text="a b a b a b")
    forced = client.completions.create(model="tiny-llama", prompt="a b a b a b", max_tokens=6, temperature=0,
                                       logit_bias={"100": 100}, extra_body={"ignore_eos": True})
    six = stub.Detokenize(pb.DetokenizeRequest(model="tiny-llama", ids=[100] * 6)).text
    assert six and forced.choices[0].text == six
    sampling = pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.8)
    sampling.logit_bias[9] = 0.5
    request = pb.GenerateRequest(model="tiny-llama", text="a b a b a b", sampling=sampling)
    expected = "".join(r.text for r in stub.Generate(request, timeout=240))
    assert expected != plain
    adjusted = client.completions.create(model="tiny-llama", prompt="a b a b a b", max_tokens=12,
                                         temperature=0, logit_bias={"9": 0.5},
                                         extra_body={"ignore_eos": True, "repetition_penalty": 1.8})
    assert adjusted.choices[0].text == expected
