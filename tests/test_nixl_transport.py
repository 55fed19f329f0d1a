"""Cross-node KV transfer: two kvtransfer agents in two processes, each its own pool, NIXL (UCX)
between them; instances' transports publish on one "node" and fetch on the other."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from tokenpool.cli.service_process import EXIT_WITH_PARENT, stop_process
from tokenpool.engine.slab_allocator import BlockShape
from tokenpool.kvtransfer.transport import KVTransferError, NodeLocalTransport
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc

# Looked up, not imported: NIXL's bindings loaded beside grpc_tools' protoc (test_protos) crash it.
if importlib.util.find_spec("nixl") is None:
    pytest.skip("nixl is not installed", allow_module_level=True)

SHAPE = BlockShape(num_layers=4, block_size=16, num_kv_heads=2, head_dim=8, dtype="float32")
STALL_S = 2.0  # the agents' stall timeout: a silent sender's blocks are freed within ~STALL_S + a sweep
FREED_WITHIN_S = 3 * STALL_S


class Agent:
    """A `python -m tokenpool.kvtransfer --nixl` process."""

    def __init__(self, tmp: Path, name: str, peer: str) -> None:
        ready = tmp / f"{name}.ready.json"
        self.log = tmp / f"{name}.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tokenpool.kvtransfer", "--name", name, "--listen", "127.0.0.1:0",
                 "--pool-mib", "16", "--slab-mib", "1", "--nixl", "--allow-peer", peer,
                 "--stall-s", str(STALL_S), "--ready-file", str(ready)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, EXIT_WITH_PARENT: str(os.getpid())})  # gone with this process
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.address = json.loads(ready.read_text())["address"]
        self.channel = grpc.insecure_channel(self.address)
        self.stub = instances_pb2_grpc.KVTransferStub(self.channel)

    def stats(self) -> ipb.PoolStats:
        return self.stub.Stats(ipb.StatsRequest(), timeout=10)

    def stop(self) -> None:
        self.channel.close()
        stop_process(self.process, 15)


def _pair(tmp: Path):
    a = Agent(tmp, "kvtransfer-a", "kvtransfer-b")
    try:
        b = Agent(tmp, "kvtransfer-b", "kvtransfer-a")
    except BaseException:
        a.stop()
        raise
    return a, b


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    a, b = _pair(tmp_path_factory.mktemp("nixl-agents"))
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def transports(agents):
    a, b = agents
    with NodeLocalTransport(a.address) as ta, NodeLocalTransport(b.address) as tb:
        yield ta, tb
    for agent in agents:
        wait_free(agent)


def wait_free(agent: Agent, within_s: float = FREED_WITHIN_S) -> float:
    """Seconds until the agent holds no handle and no block; fails after within_s."""
    start = time.monotonic()
    while True:
        stats = agent.stats()
        if not stats.handles and not stats.used_bytes:
            return time.monotonic() - start
        assert time.monotonic() - start < within_s, f"{agent.address} still holds {stats}"
        time.sleep(0.1)


def wait_handles(agent: Agent, n: int, within_s: float = 60.0) -> None:
    """Until the agent holds n handles (a transfer's first layer has reached it), however slow
    the machine; fails after within_s."""
    start = time.monotonic()
    while (held := agent.stats().handles) != n:
        assert time.monotonic() - start < within_s, f"{agent.address} holds {held} handles, expected {n}"
        time.sleep(0.02)


def device_kv(num_blocks: int, seed: int) -> torch.Tensor:
    """A fake device KV cache: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE.num_layers, 2, num_blocks, *SHAPE.dims[2:], generator=g)


def test_publish_to_another_node_moves_the_blocks_exactly(agents, transports):
    a, b = agents
    ta, tb = transports
    kv = device_kv(8, seed=1)
    ids = [5, 0, 3]
    blocks = [kv[:, :, i] for i in ids]  # non-contiguous views, as the engine hands them over
    handle = ta.publish("req-1", SHAPE, blocks, 40, destination=b.address)
    assert handle.agent == b.address and handle.num_tokens == 40
    assert a.stats().handles == 0 and b.stats().handles == 1  # the sender's blocks went at once
    for view, block in zip(tb.fetch(handle), blocks, strict=True):
        assert torch.equal(view, block)
    assert ta.pushed_bytes == 3 * SHAPE.nbytes and ta.push_seconds > 0
    tb.release(handle)


def test_streamed_layers_over_two_chunks_land_exactly(agents, transports):
    _, b = agents
    ta, tb = transports
    kv = device_kv(8, seed=2)
    ids = [7, 2, 4, 1]  # the sequence's device blocks
    stream = ta.begin("req-2", SHAPE, len(ids), destination=b.address)
    for first, chunk in ((0, ids[:2]), (1, ids[1:])):  # a chunked prefill: block 1 is in both chunks
        for layer in range(SHAPE.num_layers):
            stream.put(layer, first, kv[layer], chunk)
    handle = stream.finish(60)
    assert handle.agent == b.address
    for view, i in zip(tb.fetch(handle), ids, strict=True):
        assert torch.equal(view, kv[:, :, i])
    tb.release(handle)


def test_node_local_stream_needs_no_nixl(agents, transports):
    a, _ = agents
    ta, _ = transports
    kv = device_kv(4, seed=3)
    stream = ta.begin("req-3", SHAPE, 2)
    for layer in range(SHAPE.num_layers):
        stream.put(layer, 0, kv[layer], [3, 1])
    handle = stream.finish(20)
    assert handle.agent == a.address and ta.pushed_bytes == 0
    assert torch.equal(ta.fetch(handle)[1], kv[:, :, 1])
    ta.release(handle)


@pytest.mark.parametrize("fields, code", [
    (dict(layer_start=0, layer_end=5, block_start=0, block_end=1), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(layer_start=2, layer_end=2, block_start=0, block_end=1), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(layer_start=0, layer_end=4, block_start=1, block_end=3), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_pushes_outside_the_handle_are_refused(agents, transports, fields, code):
    a, b = agents
    request = ipb.AllocateRequest(block_dims=[4, 16, 2, 8], dtype="float32", num_blocks=2, request_id="bad",
                                  destination=b.address)
    handle = a.stub.Allocate(request, timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        a.stub.Push(ipb.PushRequest(handle_id=handle.handle_id, **fields), timeout=10)
    assert info.value.code() == code
    a.stub.Release(ipb.KVHandle(handle_id=handle.handle_id), timeout=10)  # frees both sides


def test_push_needs_a_handle_with_a_destination(agents):
    a, _ = agents
    handle = a.stub.Allocate(ipb.AllocateRequest(block_dims=[4, 16, 2, 8], dtype="float32", num_blocks=1),
                             timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        a.stub.Push(ipb.PushRequest(handle_id=handle.handle_id, layer_end=1, block_end=1), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    a.stub.Release(ipb.KVHandle(handle_id=handle.handle_id), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        a.stub.Push(ipb.PushRequest(handle_id="nope", layer_end=1, block_end=1), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_unregistered_agents_are_refused(agents):
    _, b = agents
    inbound = ipb.AllocateRequest(block_dims=[4, 16, 2, 8], dtype="float32", num_blocks=1, source="stranger")
    with pytest.raises(grpc.RpcError) as info:
        b.stub.Allocate(inbound, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "registered" in info.value.details()
    stranger = ipb.AgentInfo(name="stranger", nixl_metadata=b"x" * 64, pool_address=1 << 20,
                             pool_nbytes=1 << 20, address="127.0.0.1:1")
    with pytest.raises(grpc.RpcError) as info:
        b.stub.Connect(stranger, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # not an allowed peer
    bad = ipb.AgentInfo(name="kvtransfer-a", nixl_metadata=b"", pool_address=1, pool_nbytes=1, address="x")
    with pytest.raises(grpc.RpcError) as info:
        b.stub.Connect(bad, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert b.stats().handles == 0


def test_a_handle_of_another_node_is_not_fetched_here(agents, transports):
    _, b = agents
    ta, tb = transports
    handle = ta.publish("req-4", SHAPE, [device_kv(1, seed=4)[:, :, 0]], 16, destination=b.address)
    with pytest.raises(KVTransferError) as info:
        ta.fetch(handle)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    tb.release(handle)


def test_an_agent_without_nixl_refuses_cross_node_work(tmp_path):
    ready = tmp_path / "plain.json"
    process = subprocess.Popen([sys.executable, "-m", "tokenpool.kvtransfer", "--pool-mib", "4", "--slab-mib",
                                "1", "--ready-file", str(ready)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        while not ready.exists():
            assert process.poll() is None
            time.sleep(0.05)
        with NodeLocalTransport(json.loads(ready.read_text())["address"]) as plain:
            with pytest.raises(KVTransferError) as info:
                plain.begin("req", SHAPE, 1, destination="127.0.0.1:1")
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--nixl" in str(info.value)
    finally:
        process.terminate()
        process.wait(15)


# -- failures: each kills an agent, so each gets a fresh pair -------------------------------------------


@pytest.fixture
def fresh(tmp_path):
    a, b = _pair(tmp_path)
    yield a, b
    a.stop()
    b.stop()


def test_receiver_killed_mid_transfer_fails_the_sender_fast_and_frees_its_blocks(fresh):
    a, b = fresh
    kv = device_kv(4, seed=5)
    with NodeLocalTransport(a.address) as ta:
        stream = ta.begin("req-5", SHAPE, 2, destination=b.address)
        stream.put(0, 0, kv[0], [0, 1])
        wait_handles(b, 1)  # layer 0 is across
        b.process.kill()
        b.process.wait()
        start = time.monotonic()
        for layer in range(1, SHAPE.num_layers):
            stream.put(layer, 0, kv[layer], [0, 1])
        with pytest.raises(KVTransferError) as info:
            stream.finish(32)
        assert time.monotonic() - start < 2 * STALL_S  # the transfer timeout is STALL_S / 2
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    wait_free(a)


def test_sender_agent_killed_mid_transfer_frees_the_receivers_blocks(fresh):
    a, b = fresh
    kv = device_kv(4, seed=6)
    with NodeLocalTransport(a.address) as ta:
        stream = ta.begin("req-6", SHAPE, 2, destination=b.address)
        stream.put(0, 0, kv[0], [0, 1])
        wait_handles(b, 1)
        a.process.kill()
        a.process.wait()
        with pytest.raises(KVTransferError) as info:
            stream.finish(32)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert wait_free(b) < FREED_WITHIN_S


def test_sender_instance_gone_mid_transfer_frees_blocks_on_both_sides(fresh):
    a, b = fresh
    kv = device_kv(4, seed=7)
    with NodeLocalTransport(a.address) as ta:
        stream = ta.begin("req-7", SHAPE, 2, destination=b.address)
        stream.put(0, 0, kv[0], [0, 1])
        wait_handles(a, 1)
        wait_handles(b, 1)
        # The instance dies here: no more pushes, no MarkReady, no Release.
    wait_free(a)
    wait_free(b)


def test_unloadable_metadata_is_refused_and_the_real_peer_still_connects(fresh):
    a, b = fresh
    forged = ipb.AgentInfo(name="kvtransfer-a", nixl_metadata=b"not nixl metadata" * 4, pool_address=1 << 20,
                           pool_nbytes=1 << 20, address="127.0.0.1:1")
    with pytest.raises(grpc.RpcError) as info:
        b.stub.Connect(forged, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with NodeLocalTransport(a.address) as ta, NodeLocalTransport(b.address) as tb:
        block = device_kv(1, seed=8)[:, :, 0]
        handle = ta.publish("req-8", SHAPE, [block], 16, destination=b.address)
        assert torch.equal(tb.fetch(handle)[0], block)
        tb.release(handle)
