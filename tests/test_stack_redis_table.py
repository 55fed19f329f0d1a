"""A stack whose request table is in Redis (`tokenpool up --table-backend redis`): the instances
report into the proxies' table, so a request's row names the prefill and decode instance that
served it, seen through the table API and `tokenpool status --requests`, through the stack's own
proxy or a second proxy on the same table."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from redis_server import redis_server
from stack_helpers import service, start_tiny_stack
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc
from tokenpool.proxy.redis_request_table import RedisRequestTable, table_names
from tokenpool.proxy.request_table import RequestRecord

MODEL = "tiny-llama"
HELD_TOKENS = 1000  # a stream held open while the test looks at its row (cancelled after; context 1024)
PROGRESS_S = 30.0  # the instances' reports land in milliseconds; this only bounds a failure


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> str:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def stack(tiny_dir, tmp_path_factory, redis_url):
    stack = start_tiny_stack(tiny_dir, (MODEL,), tmp_path_factory.mktemp("logs"), prefill=1, decode=1,
                             table_slots=16, table_backend="redis", redis_url=redis_url)
    yield stack
    codes = stack.stop()
    assert codes and all(code == 0 for _, code in codes), codes
    assert stack.name not in table_names(redis_url), "the launcher deletes its stack's Redis table"


@pytest.fixture
def table(stack, redis_url):
    """The stack's table as `tokenpool status` reads it (a reporter: owns nothing)."""
    with RedisRequestTable.attach(redis_url, stack.name) as t:
        yield t


def held_stream(address: str, request_id: str):
    """A long stream, started (its first tokens arrived) -> the call, to cancel."""
    channel = grpc.insecure_channel(address)
    call = inference_pb2_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
        model=MODEL, text="progress from every node", request_id=request_id,
        sampling=pb.SamplingParams(max_tokens=HELD_TOKENS, ignore_eos=True)), timeout=120)
    next(call)
    return call, channel


def row_with_progress(table: RedisRequestTable, request_id: str) -> RequestRecord:
    """The request's row once both instances have reported into it (only instances set their names)."""
    deadline = time.monotonic() + PROGRESS_S
    while True:
        slot = table.find(request_id)
        row = table.get(slot) if slot is not None else None
        if row is not None and row.prefill_instance and row.decode_instance and row.num_output_tokens:
            return row
        assert time.monotonic() < deadline, f"no progress from the instances: {row}"
        time.sleep(0.05)


def wait_released(table: RedisRequestTable, request_id: str) -> None:
    deadline = time.monotonic() + PROGRESS_S
    while table.find(request_id) is not None:
        assert time.monotonic() < deadline, table.records()
        time.sleep(0.05)


@pytest.mark.timeout(120)  # the module's stack starts within the first test
def test_the_instances_report_into_the_redis_table_and_status_shows_it(stack, table, capsys):
    from tokenpool.cli.main import main

    call, channel = held_stream(stack.address, "redis-probe")
    try:
        row = row_with_progress(table, "redis-probe")
        assert (row.prefill_instance, row.decode_instance) == ("prefill-0", "decode-0")
        assert main(["status", "--requests"]) == 0  # finds the Redis table through the stack's file
    finally:
        call.cancel()
        channel.close()
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "redis-probe" in x)
    assert f"{stack.name} (Redis redis://127.0.0.1:" in out and "prefill-0/decode-0" in line, out
    wait_released(table, "redis-probe")


@pytest.mark.timeout(60)
def test_a_second_proxys_requests_show_the_instances_progress_too(stack, table, redis_url, tmp_path, capsys):
    from tokenpool.cli.main import main

    other, address = start_proxy(stack, tmp_path)
    try:
        call, channel = held_stream(address, "via-second-proxy")
        try:
            row = row_with_progress(table, "via-second-proxy")
            assert (row.prefill_instance, row.decode_instance) == ("prefill-0", "decode-0")
            assert row.proxy_pid == other.pid
            assert main(["status", "--requests", "--redis-url", redis_url, "--table", stack.name]) == 0
        finally:
            call.cancel()
            channel.close()
        wait_released(table, "via-second-proxy")
    finally:
        other.terminate()
        other.wait(30)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "via-second-proxy" in x)
    assert "prefill-0/decode-0" in line, out


@pytest.mark.timeout(120)
def test_redis_frozen_for_a_moment_refuses_admissions_unavailable_and_holds_up_no_stream(stack, table,
                                                                                       redis_url):
    """The proxy admits through Redis from a thread: with the server frozen (SIGSTOP) past its
    socket timeout, a new request gets UNAVAILABLE while a stream in flight keeps receiving tokens
    (the event loop never waits on Redis); afterwards requests are admitted and every row ends."""
    import contextlib
    import os
    import signal
    import threading

    import redis

    pid = redis.Redis.from_url(redis_url).info()["process_id"]
    call, channel = held_stream(stack.address, "held-through-a-freeze")
    received = []

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            for response in call:
                received.append(len(response.token_ids))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        with grpc.insecure_channel(stack.address) as other:
            stub = inference_pb2_grpc.InferenceStub(other)
            request = pb.GenerateRequest(model=MODEL, text="admitted?",
                                         sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True))
            os.kill(pid, signal.SIGSTOP)
            try:
                before = sum(received)
                with pytest.raises(grpc.RpcError) as refused:
                    list(stub.Generate(request, timeout=60))
                during = sum(received) - before
            finally:
                os.kill(pid, signal.SIGCONT)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert "request table" in refused.value.details()
            assert during > 0, "the stream in flight got nothing while the admission waited on Redis"
            assert sum(len(r.token_ids) for r in stub.Generate(request, timeout=60)) == 4
    finally:
        call.cancel()
        reader.join(30)
        channel.close()
    wait_released(table, "held-through-a-freeze")
    deadline = time.monotonic() + PROGRESS_S
    while table.usage().used:
        assert time.monotonic() < deadline, table.records()
        time.sleep(0.05)


def start_proxy(stack, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Another proxy with the stack's flags (its table too: Redis, the same name) on a free port."""
    argv = [a.decode() for a in
            Path(f"/proc/{service(stack, 'proxy').process.pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    ready = tmp_path / "proxy-b.json"
    for flag, value in (("--listen", "127.0.0.1:0"), ("--ready-file", str(ready)), ("--metrics-port", "0")):
        argv[argv.index(flag) + 1] = value
    assert argv[argv.index("--table-backend") + 1] == "redis"
    log = open(tmp_path / "proxy-b.log", "w")  # noqa: SIM115 - the child holds it
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 40
    while not ready.exists():
        assert process.poll() is None, (tmp_path / "proxy-b.log").read_text()
        assert time.monotonic() < deadline, "the second proxy never got ready"
        time.sleep(0.05)
    return process, json.loads(ready.read_text())["address"]


def test_up_passes_the_table_backend_to_the_proxy_and_every_instance(tiny_dir, tmp_path):
    from tokenpool.cli.main import build_parser
    from tokenpool.cli.up_command import stack_config
    from tokenpool.compose.launcher import Stack

    def config(*flags):
        return stack_config(build_parser().parse_args(["up", f"--model=m={tiny_dir / MODEL}", *flags]))

    url = "redis://10.0.0.5:6379/0"
    launcher = Stack(config("--table-backend", "redis", "--redis-url", url), tmp_path)
    for role, name in (("proxy", "proxy"), ("prefill", "prefill-0"), ("decode", "decode-0")):
        args = launcher._args(name, role, "127.0.0.1:7000", [])
        assert args[args.index("--table-backend") + 1] == "redis", role
        assert args[args.index("--redis-url") + 1] == url and args[args.index("--table") + 1] == launcher.name
    with pytest.raises(ValueError, match="redis_url goes with table_backend redis"):
        config("--table-backend", "redis")
    with pytest.raises(ValueError, match="redis_url goes with table_backend redis"):
        config("--redis-url", url)
