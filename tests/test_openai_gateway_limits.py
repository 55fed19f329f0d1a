"""The HTTP gateway under bad input and overload: OpenAI-shaped errors naming the field, 429 with
Retry-After at once for a burst of 10x the request table, a client that goes away cancels its
requests, and one that stops reading leaves the gateway's memory bounded."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import psutil
import pytest
from gateway_helpers import get, post, request
from stack_helpers import service, start_tiny_stack, wait_until_idle
from tokenpool.proxy.shm_request_table import ShmRequestTable

TABLE_SLOTS = 8
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def stack(tiny_dir, tmp_path_factory):
    stack = start_tiny_stack(tiny_dir, (MODEL,), tmp_path_factory.mktemp("gateway-limits-logs"), prefill=1,
                             decode=1, table_slots=TABLE_SLOTS, gateway=True, gateway_port=0)
    yield stack
    codes = stack.stop()
    assert codes and all(code == 0 for _, code in codes), codes


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **fields}


TOOLS = [{"type": "function", "function": {"name": "f"}}]
BAD = [  # (body, status, param)
    (chat(model="no-such-model"), 404, "model"),
    (chat(temperature="hot"), 400, "temperature"),
    (chat(temperature=2.5), 400, "temperature"),
    (chat(top_p=0), 400, "top_p"),
    (chat(max_tokens=0), 400, "max_tokens"),
    (chat(max_tokens=10**6), 400, "max_tokens"),  # past the model's context: the proxy's INVALID_ARGUMENT
    (chat(n=0), 400, "n"),
    (chat(n=100), 400, "n"),
    (chat(seed=-1), 400, "seed"),
    (chat(top_logprobs=50, logprobs=True), 400, "top_logprobs"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (chat(messages=[]), 400, "messages"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    (chat(presence_penalty=2.5), 400, "presence_penalty"),
    (chat(frequency_penalty=-3), 400, "frequency_penalty"),
    (chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    (chat(logit_bias={"5": 101}), 400, "logit_bias"),
    (chat(logit_bias={str(t): 1 for t in range(301)}), 400, "logit_bias"),
    (chat(logit_bias={"100000": 1}), 400, "logit_bias"),  # past the vocabulary: the proxy's INVALID_ARGUMENT
    (chat(repetition_penalty=0), 400, "repetition_penalty"),
    (chat(response_format={"type": "json_object"}), 400, "response_format"),
    (chat(tools=TOOLS), 400, "tool_choice"),
    (chat(tools=TOOLS, tool_choice="required"), 400, "tool_choice"),
    (chat(tool_choice="required"), 400, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": MODEL, "prompt": [1.5, 2]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"model": MODEL, "prompt": "x" * 50_000, "max_tokens": 1}, 400, None),  # prompt past the context
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{b[1]}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_fields_get_openai_errors_naming_them(stack, body, status, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    reply = post(stack, path, body)
    assert reply.status == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error


def test_malformed_and_oversized_bodies_and_the_stack_stays_up(stack):
    for raw in (b"{not json", b"", b"[1, 2]", b'{"model": 3}'):
        reply = request(stack, "POST", "/v1/chat/completions", raw)
        assert reply.status == 400 and "error" in reply.json(), raw
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * (2 << 20)}])).encode()
    reply = request(stack, "POST", "/v1/chat/completions", big)
    assert reply.status == 413 and reply.json()["error"]["code"] == "body_too_large"
    honoured = {"response_format": {"type": "text"}, "tools": TOOLS, "tool_choice": "none"}
    ok = post(stack, "/v1/chat/completions", chat(temperature=0, **honoured))
    assert ok.status == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert get(stack, "/health").status == 200
    assert not stack.dead()


def test_a_burst_of_ten_times_the_table_gets_fast_429s(stack):
    # Every request is sent at once (a barrier), and an admitted one decodes 900 tokens: no slot
    # frees before the burst is in, however fast or busy the machine (with 16 senders and 200
    # tokens, a busy core let admitted requests finish mid-burst and 18 of 80 got a slot).
    body = chat(max_tokens=900, temperature=0, ignore_eos=True)
    burst = 10 * TABLE_SLOTS
    ready = threading.Barrier(burst)
    ends: list[tuple[int, float, dict]] = []

    def one(_):
        ready.wait(timeout=60)
        reply = post(stack, "/v1/chat/completions", body)
        ends.append((reply.status, time.monotonic(), reply.headers))
        return reply

    with ThreadPoolExecutor(burst) as pool:
        replies = list(pool.map(one, range(burst)))
    statuses = [r.status for r in replies]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 10 * TABLE_SLOTS - 2 * TABLE_SLOTS and statuses.count(200) >= 1
    refused = [r for r in replies if r.status == 429]
    assert all(r.headers.get("retry-after", "").isdigit() for r in refused)
    assert all(r.json()["error"]["type"] == "rate_limit_exceeded" for r in refused)
    # fast: most refusals come back before the first admitted request has its 200 tokens
    first_done = min(t for status, t, _ in ends if status == 200)
    assert sum(1 for status, t, _ in ends if status == 429 and t < first_done) >= len(refused) // 2
    wait_until_idle(stack)


def test_a_client_that_goes_away_cancels_its_request(stack):
    before = aborted(stack)
    sock = open_stream(stack, max_tokens=900)
    wait_for_rows(stack, lambda rows: rows and all(r.num_output_tokens >= 2 for r in rows))
    sock.close()
    wait_until_idle(stack)
    assert aborted(stack) == before + 1, "the stream was cancelled, not finished"


def test_a_client_that_stops_reading_leaves_memory_bounded(stack):
    """The gateway turns proxy messages into events only as fast as the socket takes them: what
    it has relayed (vllm:generation_tokens_total) stalls well short of what was asked, its memory
    stays flat, and the proxy's side is bounded by the request itself (max_tokens x n)."""
    gateway = psutil.Process(service(stack, "gateway").process.pid)
    before_rss, before_tokens, before_aborted = gateway.memory_info().rss, relayed(stack), aborted(stack)
    # 8 choices of 900 tokens with 20 alternatives each: ~10 MB of events, more than the socket
    # buffers hold; the client reads nothing after sending the request.
    sock = open_stream(stack, max_tokens=900, n=TABLE_SLOTS, logprobs=True, top_logprobs=20)
    wait_for_rows(stack, lambda rows: len(rows) == TABLE_SLOTS)
    stalled = wait_for_stall(lambda: relayed(stack), start=before_tokens) - before_tokens
    assert 0 < stalled < 900 * TABLE_SLOTS / 2, f"the gateway relayed {stalled} tokens nobody read"
    growth = gateway.memory_info().rss - before_rss
    assert growth < 64 << 20, f"the gateway grew by {growth >> 20} MiB for a stalled client"
    sock.close()
    wait_until_idle(stack)
    assert aborted(stack) == before_aborted + TABLE_SLOTS


# -- helpers ---------------------------------------------------------------------------------------

def open_stream(stack, **fields) -> socket.socket:
    """A streamed chat request sent over a socket with a small receive buffer, never read."""
    url = urlsplit(stack.gateway_url)
    body = json.dumps(chat(stream=True, temperature=0, ignore_eos=True, **fields)).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((url.hostname, url.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def table_rows(stack) -> list:
    with ShmRequestTable.attach(stack.name) as table:
        return [r for _, r in table.records()]


def wait_for_rows(stack, condition, timeout=120.0) -> list:
    deadline = time.monotonic() + timeout
    while not condition(rows := table_rows(stack)):
        assert time.monotonic() < deadline, f"table never reached the condition: {rows}"
        time.sleep(0.05)
    return rows


def wait_for_stall(read, start: float, timeout=240.0) -> float:
    """read()'s value once it has moved from start and then not changed across 3 polls 0.5 s apart."""
    deadline, seen, same = time.monotonic() + timeout, start, 0
    while same < 3 or seen == start:
        assert time.monotonic() < deadline, "never stalled"
        value = read()
        same = same + 1 if value == seen != start else 0
        seen = value
        time.sleep(0.5)
    return seen


def relayed(stack) -> float:
    return metric(stack, rf'vllm:generation_tokens_total{{model_name="{MODEL}"}}')


def aborted(stack) -> float:
    return metric(stack, rf'vllm:request_success_total{{finished_reason="abort",model_name="{MODEL}"}}')


def metric(stack, series: str) -> float:
    found = re.search(rf"^{series} (\S+)", get(stack, "/metrics").text, re.M)
    return float(found.group(1))
