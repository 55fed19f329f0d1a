"""A bounded soak: normal, cancelled, malformed and deadline-cut requests for a fixed count, with
a decode instance hung (SIGSTOP) and resumed part-way; afterwards every counter is back to its
idle value: request-table slots, hand-off handles and bytes, instance KV blocks and host KV,
file descriptors of every service, and the shared memory each service has mapped (a model an
instance served stays attached: the node's model cache is a cache, bounded by the models)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from stack_helpers import agent_stats, instance_status, service, start_tiny_stack, wait_until_idle
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc

MODELS = ("tiny-llama", "tiny-qwen2")
REQUESTS = 240
CLIENTS = 12
KINDS = ("normal", "cancelled", "malformed", "deadline")
SHM = Path("/dev/shm")
MODEL_SEGMENTS = "/models/"  # the host model cache's segments (engine/host_model_cache.py)


def fds(pid: int) -> dict[str, int]:
    """Open descriptors by kind (socket, pipe, anon_inode:[eventfd], a file's path...)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        kind = target.split(":[")[0] if ":[" in target else target
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def shm_mapped(pid: int) -> set[str]:
    """The shared-memory files the process has mapped (its own and the ones it attached)."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split(None, 5)[5].strip() for line in maps
                if len(line.split(None, 5)) == 6 and line.split(None, 5)[5].startswith(str(SHM))}


def snapshot(stack) -> dict:
    instances = [s.name for s in stack.services if s.name.startswith(("prefill", "decode"))]
    statuses = {n: instance_status(stack, n) for n in instances}
    stats = agent_stats(stack)
    return {"fds": {s.name: fds(s.process.pid) for s in stack.services},
            "kv_blocks": {n: s.kv_blocks_used for n, s in statuses.items()},
            "host_kv_bytes": {n: s.host_kv_used_bytes for n, s in statuses.items()},
            "handoff": (stats.handles, stats.blocks, stats.used_bytes),
            "shm": {s.name: shm_mapped(s.process.pid) for s in stack.services}}


@pytest.fixture
def stack(tiny_dir, tmp_path):
    stack = start_tiny_stack(tiny_dir, MODELS, tmp_path / "logs", prefill=1, decode=2, table_slots=64)
    yield stack
    stack.stop()


def one(stub, kind: str, i: int, rng: random.Random) -> str:
    model = MODELS[i % 2]
    if kind == "malformed":
        bad = rng.choice([{"model": "no-such-model", "text": "hi"}, {"model": model, "text": ""},
                          {"model": model, "text": "hi", "sampling": pb.SamplingParams(top_p=7.0)},
                          {"model": model, "token_ids": pb.TokenIds(ids=[10**7])}])
        try:
            list(stub.Generate(pb.GenerateRequest(**bad), timeout=30))
        except grpc.RpcError as exc:
            return exc.code().name
        return "OK?"
    n = rng.randint(4, 64)
    request = pb.GenerateRequest(model=model, text=f"soak request {i}", sampling=pb.SamplingParams(
        max_tokens=n, ignore_eos=True))
    timeout = 0.05 if kind == "deadline" else 120
    call = stub.Generate(request, timeout=timeout)
    tokens = 0
    try:
        for response in call:
            tokens += len(response.token_ids)
            if kind == "cancelled" and tokens >= 2:
                call.cancel()
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK" if tokens == n else f"SHORT {tokens}/{n}"


def warm_up(stack) -> None:
    """Every kind of request once per model and client slot: lazily made thread pools, connections
    and buffers exist from here on, so what the soak adds after this is a leak."""
    with grpc.insecure_channel(stack.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        jobs = [(kind, i) for i in range(CLIENTS) for kind in KINDS]
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda job: one(stub, job[0], job[1], random.Random(job[1])), jobs))
    wait_until_idle(stack, timeout=60)
    time.sleep(1)


def test_a_bounded_soak_returns_every_counter_to_idle(stack, capsys):
    warm_up(stack)
    idle = snapshot(stack)
    rng = random.Random(11)
    kinds = rng.choices(KINDS, weights=[60, 15, 15, 10], k=REQUESTS)
    outcomes: dict[str, dict[str, int]] = {}
    lock = threading.Lock()
    started = time.monotonic()

    def hang_and_resume():
        time.sleep(4)
        victim = service(stack, "decode-1").process.pid
        os.kill(victim, signal.SIGSTOP)
        time.sleep(6)
        os.kill(victim, signal.SIGCONT)

    fault = threading.Thread(target=hang_and_resume)
    with grpc.insecure_channel(stack.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        fault.start()

        def run(i):
            result = one(stub, kinds[i], i, random.Random(i))
            with lock:
                outcomes.setdefault(kinds[i], {}).setdefault(result, 0)
                outcomes[kinds[i]][result] += 1

        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(run, range(REQUESTS)))
        fault.join()
    seconds = time.monotonic() - started
    assert outcomes["normal"] == {"OK": kinds.count("normal")}, outcomes  # every accepted stream whole
    assert set(outcomes["malformed"]) <= {"NOT_FOUND", "INVALID_ARGUMENT"}, outcomes
    assert set(outcomes["cancelled"]) <= {"CANCELLED", "OK"}, outcomes
    assert set(outcomes["deadline"]) <= {"DEADLINE_EXCEEDED", "OK"}, outcomes
    wait_until_idle(stack, timeout=60)
    deadline = time.monotonic() + 30
    while (after := snapshot(stack)) != idle and time.monotonic() < deadline:
        time.sleep(0.5)  # descriptors of cancelled calls close asynchronously
    with capsys.disabled():
        total = {when: {n: sum(k.values()) for n, k in snap["fds"].items()} for when, snap in
                 (("idle", idle), ("after", after))}
        mapped = {when: {n: len(v) for n, v in snap["shm"].items()} for when, snap in
                  (("idle", idle), ("after", after))}
        print(f"\nsoak: {REQUESTS} requests in {seconds:.1f} s, outcomes {outcomes}; fds {total}; "
              f"shm mapped {mapped}; KV blocks {after['kv_blocks']}, host KV bytes {after['host_kv_bytes']}, "
              f"hand-off (handles, blocks, bytes) {after['handoff']}")
    for key in ("kv_blocks", "host_kv_bytes", "handoff"):
        assert after[key] == idle[key], key
    for name in idle["fds"]:
        # A model an instance served during the soak stays attached (the node's host model cache,
        # a warm cache, not request state): at most one segment per registered model.
        models_after = {k: n for k, n in after["fds"][name].items()
                        if MODEL_SEGMENTS in k and k.endswith(".seg")}  # not .capacity: held for life
        assert len(models_after) <= len(MODELS), (name, models_after)
        before = {k: n for k, n in idle["fds"][name].items() if MODEL_SEGMENTS not in k}
        now = {k: n for k, n in after["fds"][name].items() if MODEL_SEGMENTS not in k}
        # gRPC reconnects (the hung instance's peers) may leave a connection open until keepalive
        # closes it: at most one per peer service, never growing with the request count.
        peers = len(stack.services) - 1
        assert now.pop("socket", 0) <= before.pop("socket", 0) + peers, (name, idle["fds"][name],
                                                                         after["fds"][name])
        assert now == before, (name, before, now)  # pipes, eventfds, files: exactly as idle
        assert {m for m in after["shm"][name] if MODEL_SEGMENTS not in m} == \
            {m for m in idle["shm"][name] if MODEL_SEGMENTS not in m}, name
