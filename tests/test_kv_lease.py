"""KV hand-off leases: a ready handle is held for its receiver only while the receiver renews it.
The book's rules on a fake clock, the renewer on a real event loop, and the faults for real: a
receiver process killed -9 while it holds a handle, and a stack whose proxy hangs and whose
decode instance is killed in the middle of hand-offs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from stack_helpers import service, start_tiny_stack
from test_kvtransfer import POOL_BYTES, SHAPE, SLAB_BYTES, FakeClock, random_blocks, start_agent
from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.kvtransfer.agent import HandleBook
from tokenpool.kvtransfer.lease import MIN_LEASE_S, LeaseRenewer
from tokenpool.kvtransfer.transport import NodeLocalTransport
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc

LEASE_S = 2.0
SWEEP_S = LEASE_S / 4  # the agent sweeps at a quarter of the lease
SLACK_S = 1.5  # a loaded 2-core machine: process scheduling, the poll below


@pytest.fixture
def pool():
    with HostKVPool(POOL_BYTES, slab_bytes=SLAB_BYTES) as p:
        yield p


def test_a_ready_handle_is_freed_when_its_lease_is_not_renewed(pool, caplog):
    clock = FakeClock()
    book = HandleBook(pool, ttl_s=300, clock=clock, lease_s=10)
    renewed, forgotten, writing = (book.allocate(SHAPE, 2, f"req-{i}") for i in range(3))
    book.mark_ready(renewed.handle_id, 20)
    book.mark_ready(forgotten.handle_id, 20)
    for _ in range(5):  # 5 x 8 s: renewed each time, so held far past one lease
        clock.now += 8
        assert book.renew([renewed.handle_id, writing.handle_id]) == []
        expired = book.reclaim_expired()
        if expired:
            assert expired == [forgotten.handle_id]
    assert not book.is_live(forgotten.handle_id)
    assert book.is_live(renewed.handle_id) and book.is_live(writing.handle_id)  # not ready: its ttl rules
    assert "lease ran out" in caplog.text and "req-1" in caplog.text
    assert book.renew([forgotten.handle_id, "never-was"]) == [forgotten.handle_id, "never-was"]
    clock.now += 10
    with caplog.at_level(logging.WARNING, logger="tokenpool.kvtransfer.agent"):
        assert book.reclaim_expired() == [renewed.handle_id]  # the renewals stopped
    assert book.stats().handles == 1 and pool.stats().used_bytes == 2 * SHAPE.nbytes
    clock.now += 300
    assert book.reclaim_expired() == [writing.handle_id]  # never marked ready: the ttl
    assert pool.stats().used_bytes == 0


def test_a_lease_shorter_than_a_few_heartbeats_is_refused(pool, tmp_path):
    with pytest.raises(ValueError, match="lease must be at least"):
        HandleBook(pool, lease_s=MIN_LEASE_S / 2)
    flags = ["--listen", "127.0.0.1:0", "--lease-s", str(MIN_LEASE_S / 2)]
    run = subprocess.run([sys.executable, "-m", "tokenpool.kvtransfer", *flags], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "--lease-s" in run.stderr and "at least" in run.stderr


def test_the_renewer_heartbeats_what_it_holds_and_drops_what_the_agent_lost(caplog):
    calls: list[list[str]] = []
    failures = [RuntimeError("agent unreachable")]

    async def renew(ids):
        calls.append(sorted(ids))
        if failures:
            raise failures.pop()
        return [i for i in ids if i == "lost"]

    async def scenario():
        renewer = LeaseRenewer(renew, interval_s=0.02)
        renewer.hold("a")
        renewer.hold("a")  # two holders of one handle (a retried request)
        renewer.hold("lost")
        await asyncio.sleep(0.1)
        held_then = renewer.held
        renewer.let_go("a")
        still = renewer.held
        renewer.let_go("a")
        await asyncio.sleep(0.06)
        idle_calls = len(calls)
        await asyncio.sleep(0.06)
        renewer.close()
        return held_then, still, renewer.held, idle_calls, renewer.renewals

    held_then, still, after, idle_calls, renewals = asyncio.run(scenario())
    assert calls[0] == ["a", "lost"] and renewals >= 1  # the first failure was retried
    assert "renewing 2 KV handle leases failed" in caplog.text
    assert held_then == {"a"} and still == {"a"} and after == frozenset()
    assert len(calls) == idle_calls  # nothing held: no heartbeats


RECEIVER = """
import asyncio, sys
from tokenpool.kvtransfer.lease import LeaseRenewer
from tokenpool.kvtransfer.transport import NodeLocalTransport

async def main(address):
    transport = NodeLocalTransport(address)
    renewer = LeaseRenewer(lambda ids: asyncio.to_thread(transport.renew, ids))
    print("ready", flush=True)
    renewer.hold(sys.stdin.readline().strip())
    print("holding", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1]))
"""


def _stats(address: str) -> ipb.PoolStats:
    with grpc.insecure_channel(address) as channel:
        return instances_pb2_grpc.KVTransferStub(channel).Stats(ipb.StatsRequest(), timeout=10)


def _peak_handles_while_prefills_drain(agent: str, prefill: str, limit_s: float = 120.0) -> int:
    """The most handles the agent held until the prefill instance had nothing queued or running
    (its last hand-off published, so every lease has started), however long the queue takes."""
    peak, start = 0, time.monotonic()
    with grpc.insecure_channel(prefill) as channel:
        stub = instances_pb2_grpc.PrefillStub(channel)
        while (status := stub.Status(ipb.StatusRequest(), timeout=10)).queued or status.running:
            if time.monotonic() - start > limit_s:
                pytest.fail(f"the prefill queue did not drain in {limit_s:.0f} s: {status}")
            peak = max(peak, _stats(agent).handles)
            time.sleep(0.05)
    return max(peak, _stats(agent).handles)


def _seconds_until_empty(address: str, limit_s: float) -> float:
    start = time.monotonic()
    while (stats := _stats(address)).handles or stats.used_bytes:
        if time.monotonic() - start > limit_s:
            pytest.fail(f"the agent still holds {stats.handles} handles ({stats.used_bytes} bytes) "
                        f"after {limit_s:.1f} s")
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_receiver_killed_while_holding_kv_gives_the_blocks_back_within_the_lease(tmp_path):
    proc, ready = start_agent(tmp_path / "ready.json", "--lease-s", str(LEASE_S))
    receiver = None
    try:
        receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, ready["address"]],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert receiver.stdout.readline().strip() == "ready"  # imported and connected
        with NodeLocalTransport(ready["address"]) as sender:
            held = sender.publish("req-held", SHAPE, random_blocks(SHAPE, 3, seed=1), num_tokens=40)
            sender.publish("req-unclaimed", SHAPE, random_blocks(SHAPE, 2, seed=2), num_tokens=20)
        receiver.stdin.write(held.handle_id + "\n")
        receiver.stdin.flush()
        assert receiver.stdout.readline().strip() == "holding"
        time.sleep(2.5 * LEASE_S)  # the receiver's heartbeats hold its handle; nobody holds the other
        stats = _stats(ready["address"])
        assert (stats.handles, stats.blocks) == (1, 3)
        os.kill(receiver.pid, signal.SIGKILL)
        receiver.wait(10)
        waited = _seconds_until_empty(ready["address"], LEASE_S + SWEEP_S + SLACK_S)
        assert waited <= LEASE_S + SWEEP_S + SLACK_S
    finally:
        if receiver is not None and receiver.poll() is None:
            receiver.kill()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert "lease ran out" in proc.stderr.read()


def test_killing_the_decode_side_during_hand_offs_returns_the_senders_blocks_within_the_lease(
        tiny_dir, tmp_path):
    """The proxy hangs (SIGSTOP: no clean-up from it) while prefills go on publishing KV, and the
    decode instance is killed -9: every handed-off handle is freed by its lease."""
    stack = start_tiny_stack(tiny_dir, ["tiny-llama"], tmp_path / "logs", decode=1, kv_lease_s=LEASE_S)
    try:
        agent, proxy, decode = (service(stack, n) for n in ("kvtransfer-0", "proxy", "decode-0"))
        prompt = " ".join(f"word{i}" for i in range(150))
        with grpc.insecure_channel(stack.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            sampling = pb.SamplingParams(max_tokens=200, ignore_eos=True)
            calls = [stub.Generate(pb.GenerateRequest(model="tiny-llama", text=prompt, sampling=sampling),
                                   timeout=120) for _ in range(24)]
            assert next(calls[0]).token_ids  # the first prefill is done; the others queue behind it
            proxy.process.send_signal(signal.SIGSTOP)
            try:
                decode.process.kill()
                decode.process.wait(10)
                peak = _peak_handles_while_prefills_drain(agent.address, service(stack, "prefill-0").address)
                waited = _seconds_until_empty(agent.address, LEASE_S + SWEEP_S + SLACK_S)
            finally:
                proxy.process.send_signal(signal.SIGCONT)
            for call in calls:
                call.cancel()
        assert peak >= 1, "no hand-off was in flight when the decode side died: the test tested nothing"
        assert waited <= LEASE_S + SWEEP_S + SLACK_S
        assert "lease ran out" in agent.log.read_text()
    finally:
        stack.stop()
