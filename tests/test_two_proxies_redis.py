"""Two proxies share one request table in Redis in front of the same instances: kill -9 of one
mid-stream; its clients reconnect to the other and every request completes there, and the
survivor reclaims the dead proxy's rows (and their hand-off KV) once its heartbeat lapses.
A proxy fenced by a Redis restarted empty turns NOT_SERVING, refuses, and exits to be restarted.
A catalogue change made through one proxy is served by the others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis_server import redis_server
from stack_helpers import service, start_tiny_stack, stream, wait_until_idle
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc
from tokenpool.proxy.__main__ import EXIT_FENCED, FENCE_POLL_S, FENCED_NOTICE_S
from tokenpool.proxy.redis_request_table import DEFAULT_TTL_S, HEARTBEATS_PER_TTL, RedisRequestTable
from tokenpool.proxy.stop_serving import STOP_GRACE_S
from tokenpool.proxy.table_recovery import RECLAIM_EVERY_S
from waiting import wait_for

MODELS = ("tiny-llama", "tiny-qwen3")
STREAMS, TOKENS, SLOTS = 40, 48, 64
TABLE = "shared"


@pytest.fixture
def stack(tiny_dir, tmp_path):
    stack = start_tiny_stack(tiny_dir, MODELS, tmp_path / "logs", prefill=1, decode=1)
    yield stack
    stack.stop()


def start_proxy(stack, tmp_path: Path, name: str, url: str) -> tuple[subprocess.Popen, str]:
    """Another proxy with the stack's wiring, on a free port, on the Redis table -> (process, address)."""
    argv = [a.decode() for a in
            Path(f"/proc/{service(stack, 'proxy').process.pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    ready = tmp_path / f"{name}.json"
    for flag, value in (("--listen", "127.0.0.1:0"), ("--ready-file", str(ready)), ("--table", TABLE),
                        ("--table-slots", str(SLOTS))):
        argv[argv.index(flag) + 1] = value
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - the child holds it
    process = subprocess.Popen(argv + ["--table-backend", "redis", "--redis-url", url], stdout=log,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None, (tmp_path / f"{name}.log").read_text()
        assert time.monotonic() < deadline, f"{name} never got ready"
        time.sleep(0.05)
    return process, json.loads(ready.read_text())["address"]


def client(i: int, addresses: list[str], outcomes: dict, received: list[int]) -> None:
    """Stream from the first proxy; on UNAVAILABLE (it died) reconnect to the next one."""
    request = pb.GenerateRequest(model=MODELS[i % 2], text=f"stream {i}",
                                 sampling=pb.SamplingParams(max_tokens=TOKENS, ignore_eos=True))
    for tried, address in enumerate(addresses, 1):
        tokens = 0
        with grpc.insecure_channel(address) as channel:
            try:
                for response in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120):
                    tokens += len(response.token_ids)
                    received[0] += len(response.token_ids)
                outcomes[i] = ("completed", tokens, tried)
                return
            except grpc.RpcError as exc:
                outcomes[i] = (exc.code(), tokens, tried)
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    return


@pytest.mark.timeout(180)
def test_a_killed_proxys_clients_move_to_the_survivor_and_its_rows_are_reclaimed(stack, tmp_path):
    with redis_server(tmp_path) as url:
        doomed, doomed_address = start_proxy(stack, tmp_path, "proxy-a", url)
        survivor, survivor_address = start_proxy(stack, tmp_path, "proxy-b", url)
        try:
            run_and_kill(doomed, doomed_address, survivor_address)
            table = RedisRequestTable(url, TABLE, SLOTS)
            try:
                wait_for_reclaim(table)
            finally:
                table.close()
            assert "reclaimed" in (tmp_path / "proxy-b.log").read_text()
            wait_until_idle(stack, ["prefill-0", "decode-0"], timeout=60)  # hand-off pool, instances
        finally:
            for p in (doomed, survivor):
                p.kill()
                p.wait(30)


def run_and_kill(doomed: subprocess.Popen, doomed_address: str, survivor_address: str) -> None:
    outcomes, received = {}, [0]
    routes = [[doomed_address, survivor_address] if i % 2 else [survivor_address] for i in range(STREAMS)]
    threads = [threading.Thread(target=client, args=(i, routes[i], outcomes, received))
               for i in range(STREAMS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while received[0] < STREAMS * TOKENS // 4:
        assert time.monotonic() < deadline, "the streams never got going"
        time.sleep(0.01)
    os.kill(doomed.pid, signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert len(outcomes) == STREAMS
    failed = {i: o for i, o in outcomes.items() if o[:2] != ("completed", TOKENS)}
    assert not failed, f"every request, reconnected or not, completes on the survivor: {failed}"
    assert any(o[2] == 2 for o in outcomes.values()), "the kill caught no stream mid-way"


def wait_for_reclaim(table: RedisRequestTable) -> None:
    """The dead proxy's rows go once its heartbeat lapses and the survivor's next sweep runs."""
    deadline = time.monotonic() + DEFAULT_TTL_S + 2 * RECLAIM_EVERY_S + 10
    while table.usage().used:
        assert time.monotonic() < deadline, f"rows left: {table.records()}"
        time.sleep(0.2)


@pytest.mark.timeout(180)
def test_a_fenced_proxy_stops_serving_and_exits_to_be_restarted(stack, tmp_path):
    with redis_server(tmp_path) as url:
        proxy, address = start_proxy(stack, tmp_path, "proxy-f", url)
        try:
            with grpc.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == SERVING
                redis.Redis.from_url(url).flushall()  # a Redis restarted empty: every heartbeat is gone
                wait_for_not_serving(health)
                request = pb.GenerateRequest(model=MODELS[0], text="hi")
                with pytest.raises(grpc.RpcError) as refused:
                    next(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert "heartbeat" in refused.value.details() and "lapsed" in refused.value.details()
            deadline_s = FENCED_NOTICE_S + STOP_GRACE_S + 30  # generous: a loaded machine
            assert proxy.wait(deadline_s) == EXIT_FENCED
            log = (tmp_path / "proxy-f.log").read_text()
            assert "ERROR: request table 'shared' fenced this proxy" in log and f"status {EXIT_FENCED}" in log
        finally:
            proxy.kill()
            proxy.wait(30)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for_not_serving(health) -> None:
    """"" and each service turn NOT_SERVING once the next heartbeat finds its key gone."""
    deadline = time.monotonic() + DEFAULT_TTL_S / HEARTBEATS_PER_TTL + FENCE_POLL_S + 20
    while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status != NOT_SERVING:
        assert time.monotonic() < deadline, "a fenced proxy still answers SERVING"
        time.sleep(0.05)
    for name in ("tokenpool.v1.Inference", "tokenpool.v1.Admin"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == NOT_SERVING


@pytest.mark.timeout(300)
def test_a_catalogue_change_through_one_proxy_is_served_by_the_others(tiny_dir, token_file, tmp_path):
    """Proxies on one Redis table share the catalogue: a model added through proxy A is served by B
    within its poll (the same tokens), one removed through B stops being served by A, and a proxy
    started afterwards from the same flags serves the changed catalogue, not its flags'."""
    from tokenpool.protos.v1 import admin_pb2 as apb
    from tokenpool.protos.v1 import admin_pb2_grpc
    from tokenpool.proxy.shared_catalogue import POLL_S

    stack = start_tiny_stack(tiny_dir, MODELS, tmp_path / "logs", prefill=1, decode=1,
                             admin_token_file=token_file)
    auth = [("authorization", f"Bearer {token_file.read_text().strip()}")]
    proxies = []
    try:
        with redis_server(tmp_path) as url:
            for name in ("proxy-a", "proxy-b"):
                proxies.append(start_proxy(stack, tmp_path, name, url))
            (_, a), (_, b) = proxies
            with grpc.insecure_channel(a) as channel:
                added = apb.AddModelRequest(id="added", folder=str(tiny_dir / "tiny-qwen3"))
                admin_pb2_grpc.AdminStub(channel).AddModel(added, metadata=auth, timeout=120)
            wait_for(lambda: "added" in served(b), "proxy-b never served the model added through proxy-a",
                     timeout_s=30 * POLL_S)
            assert greedy(b, "added") == greedy(a, "tiny-qwen3")
            with grpc.insecure_channel(b) as channel:
                admin_pb2_grpc.AdminStub(channel).RemoveModel(apb.ModelRef(id="tiny-llama"), metadata=auth,
                                                              timeout=120)
            wait_for(lambda: "tiny-llama" not in served(a), "proxy-a still serves the model removed through "
                     "proxy-b", timeout_s=30 * POLL_S)
            proxies.append(start_proxy(stack, tmp_path, "proxy-c", url))
            assert served(proxies[-1][1]) == ["added", "tiny-qwen3"]
            assert served(a) == served(b) == ["added", "tiny-qwen3"]
    finally:
        for process, _ in proxies:
            process.kill()
            process.wait(30)
        stack.stop()


def served(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        reply = inference_pb2_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    return sorted(m.id for m in reply.models)


def greedy(address: str, model: str) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        return [t for r in stream(inference_pb2_grpc.InferenceStub(channel), model, "The quick brown fox", 8)
                for t in r.token_ids]
