"""The node-local KV hand-off: handles, the agent's bookkeeping, pool attachments, the gRPC agent
in-process and as a real process with KV bytes moving between processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenpool.cli.service_process import start_grpc_server
from tokenpool.engine import host_kv_pool
from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.engine.private_shm import shm_root
from tokenpool.engine.slab_allocator import BlockShape, KVPoolFullError
from tokenpool.kvtransfer.agent import SERVICE_NAME, HandleBook, KVTransferAgent, UnknownHandleError
from tokenpool.kvtransfer.handle import KVHandleInfo, handle_from_pb, handle_to_pb
from tokenpool.kvtransfer.pool_attachment import PoolAttachment
from tokenpool.kvtransfer.transport import KVTransferError, NodeLocalTransport, make_transport
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc

SHAPE = BlockShape(num_layers=2, block_size=16, num_kv_heads=2, head_dim=8, dtype="float32")  # 4 KiB
SLAB_BYTES = 64 << 10  # 16 float32 blocks of SHAPE
POOL_BYTES = 4 * SLAB_BYTES  # 64 float32 blocks


def random_blocks(shape: BlockShape, n: int, seed: int) -> list[torch.Tensor]:
    # The publisher child in test_kv_moves_between_processes draws its blocks with the same formula.
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape.dims, generator=g).to(shape.torch_dtype) for _ in range(n)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pool():
    with HostKVPool(POOL_BYTES, slab_bytes=SLAB_BYTES) as p:
        yield p


# -- handles -------------------------------------------------------------------


def test_handle_round_trips_through_protobuf():
    h = KVHandleInfo("abc", (0, 4096, 8192), SHAPE, 40)
    msg = handle_to_pb(h, ready=False)
    assert list(msg.block_dims) == [2, 16, 2, 8] and msg.dtype == "float32" and not msg.ready
    assert handle_from_pb(ipb.KVHandle.FromString(msg.SerializeToString())) == h


@pytest.mark.parametrize("change, field", [
    (dict(block_dims=[2, 16, 2]), "block_dims"),
    (dict(block_dims=[2, 16, 0, 8]), "block_dims"),
    (dict(dtype="int8"), "dtype"),
    (dict(handle_id=""), "handle_id"),
    (dict(num_tokens=49), "num_tokens"),
])
def test_handle_from_pb_names_the_bad_field(change, field):
    msg = handle_to_pb(KVHandleInfo("abc", (0, 4096, 8192), SHAPE, 40))
    for name, value in change.items():
        if name == "block_dims":
            del msg.block_dims[:]
            msg.block_dims.extend(value)
        else:
            setattr(msg, name, value)
    with pytest.raises(ValueError, match=field):
        handle_from_pb(msg)


# -- the agent's bookkeeping ---------------------------------------------------------


def test_book_allocates_marks_ready_and_releases(pool):
    book = HandleBook(pool, ttl_s=60, clock=FakeClock())
    a = book.allocate(SHAPE, 3, "req-a")
    b = book.allocate(SHAPE, 2, "req-b")
    assert a.handle_id != b.handle_id and len(set(a.offsets) | set(b.offsets)) == 5
    assert (a.num_tokens, book.stats().handles, book.stats().blocks) == (0, 2, 5)
    assert pool.stats().used_bytes == 5 * SHAPE.nbytes
    assert book.mark_ready(a.handle_id, 48).num_tokens == 48
    with pytest.raises(ValueError, match="num_tokens=49"):
        book.mark_ready(a.handle_id, 49)
    assert book.release(a.handle_id) == 3
    assert book.release(b.handle_id) == 2
    assert (book.stats().handles, book.stats().blocks, pool.stats().used_bytes) == (0, 0, 0)


def test_book_releases_every_handle_of_a_request(pool):
    book = HandleBook(pool, ttl_s=60)
    book.allocate(SHAPE, 2, "req-a")
    book.allocate(SHAPE, 1, "req-a")  # e.g. a retried prefill
    kept = book.allocate(SHAPE, 3, "req-b")
    assert book.release_request("req-a") == 3
    assert book.release_request("req-a") == 0  # nothing left: not an error
    assert book.stats().handles == 1 and pool.stats().used_bytes == 3 * SHAPE.nbytes
    with pytest.raises(ValueError, match="request_id is empty"):
        book.release_request("")
    assert book.release(kept.handle_id) == 3


def test_book_refuses_and_changes_nothing(pool):
    book = HandleBook(pool, ttl_s=60)
    with pytest.raises(ValueError, match="num_blocks"):
        book.allocate(SHAPE, 0)
    with pytest.raises(ValueError, match="slab"):
        book.allocate(BlockShape(64, 16, 2, 8, "float32"), 1)  # 128 KiB > a 64 KiB slab
    with pytest.raises(KVPoolFullError):
        book.allocate(SHAPE, POOL_BYTES // SHAPE.nbytes + 1)
    for call in (book.release, lambda h: book.mark_ready(h, 1)):
        with pytest.raises(UnknownHandleError, match="nope"):
            call("nope")
    assert book.stats().handles == 0 and pool.stats().used_bytes == 0


def test_book_reclaims_unreleased_handles_after_their_ttl(pool, caplog):
    clock = FakeClock()
    book = HandleBook(pool, ttl_s=300, clock=clock)
    old = book.allocate(SHAPE, 2, "req-crashed")
    clock.now += 200
    young = book.allocate(SHAPE, 1, "req-young")
    clock.now += 99.9
    assert book.reclaim_expired() == []
    clock.now += 0.1
    with caplog.at_level(logging.WARNING, logger="tokenpool.kvtransfer.agent"):
        assert book.reclaim_expired() == [old.handle_id]
    assert "req-crashed" in caplog.text and old.handle_id in caplog.text
    assert book.stats().handles == 1 and pool.stats().used_bytes == SHAPE.nbytes
    with pytest.raises(UnknownHandleError):
        book.release(old.handle_id)
    book.release(young.handle_id)


def test_agent_sweep_reclaims_in_the_background():
    async def scenario():
        agent = KVTransferAgent(POOL_BYTES, slab_bytes=SLAB_BYTES, handle_ttl_s=0.1, sweep_interval_s=0.02)
        try:
            agent.start()
            agent.book.allocate(SHAPE, 4, "req-lost")
            await asyncio.sleep(0.3)
            return agent.book.stats().handles, agent.pool.stats().used_bytes
        finally:
            agent.close()
            assert not agent.pool.path.exists()
    assert asyncio.run(scenario()) == (0, 0)


def test_agent_refuses_a_pool_other_processes_cannot_map(monkeypatch, tmp_path):
    monkeypatch.setattr(host_kv_pool, "DEFAULT_SHM_DIR", tmp_path / "no-shm")
    with pytest.warns(UserWarning, match="anonymous"), pytest.raises(RuntimeError, match="other processes"):
        KVTransferAgent(POOL_BYTES, slab_bytes=SLAB_BYTES)


# -- attaching the pool file --------------------------------------------------------


def test_attachment_shares_memory_with_the_pool(pool):
    offsets = pool.alloc(SHAPE, 2)
    with PoolAttachment(pool.path, pool.nbytes) as att:
        views = att.views(offsets, SHAPE)
        assert [tuple(v.shape) for v in views] == [SHAPE.dims] * 2 and views[0].dtype == torch.float32
        views[1].fill_(7.0)
        assert torch.all(pool.block_view(offsets[1], SHAPE) == 7.0)
        assert torch.all(pool.block_view(offsets[0], SHAPE) == 0.0)
        pool.block_view(offsets[0], SHAPE)[1, 0, 3] = 2.5
        assert torch.all(views[0][1, 0, 3] == 2.5)


@pytest.mark.parametrize("offset", [-4, 2, POOL_BYTES, POOL_BYTES - SHAPE.nbytes + 4, 1 << 62, 4096.0])
def test_attachment_refuses_offsets_outside_the_file(pool, offset):
    with PoolAttachment(pool.path, pool.nbytes) as att:
        with pytest.raises(ValueError, match="offset"):
            att.views([0, offset], SHAPE)
        assert len(att.views([0, POOL_BYTES - SHAPE.nbytes], SHAPE)) == 2  # the last block fits


@pytest.fixture
def shm_file():
    """A 4096-byte file directly in shm_root(), mode 0600; removed afterwards."""
    root = shm_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = root / f"test-kvtransfer-{os.getpid()}"
    path.write_bytes(bytes(4096))
    path.chmod(0o600)
    yield path
    path.unlink(missing_ok=True)


def test_attachment_refuses_files_it_should_not_trust(shm_file, tmp_path):
    PoolAttachment(shm_file, 4096).close()  # the baseline is accepted
    with pytest.raises(ValueError, match="4096 bytes"):
        PoolAttachment(shm_file, 8192)
    link = shm_file.with_name(shm_file.name + "-link")
    link.symlink_to(shm_file)
    try:
        with pytest.raises(PermissionError, match="symlink"):
            PoolAttachment(link, 4096)
    finally:
        link.unlink()
    elsewhere = tmp_path / "pool"
    elsewhere.write_bytes(bytes(4096))
    elsewhere.chmod(0o600)
    with pytest.raises(PermissionError, match="not in"):
        PoolAttachment(elsewhere, 4096)
    shm_file.chmod(0o644)
    with pytest.raises(PermissionError, match="mode"):
        PoolAttachment(shm_file, 4096)


# -- the agent over gRPC, in this process ---------------------------------------------


class AgentThread:
    """A KVTransferAgent served by grpc.aio on its own event loop thread, so sync clients may block."""

    def __init__(self, **agent_options) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.agent, self.server = self._run(self._start(agent_options))
        self.address = self.server.address

    def close(self) -> None:
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _start(self, options):
        agent = KVTransferAgent(**options)
        servicers = [(instances_pb2_grpc.add_KVTransferServicer_to_server, agent)]
        server = await start_grpc_server("127.0.0.1:0", servicers, [SERVICE_NAME])
        agent.start()
        return agent, server

    async def _stop(self) -> None:
        await self.server.grpc.stop(0)
        self.agent.close()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)


@pytest.fixture(scope="module")
def agent():
    served = AgentThread(pool_bytes=POOL_BYTES, slab_bytes=SLAB_BYTES)
    yield served
    served.close()
    assert not served.agent.pool.path.exists()


@pytest.fixture(scope="module")
def stub(agent):
    with grpc.insecure_channel(agent.address) as channel:
        yield instances_pb2_grpc.KVTransferStub(channel)


@pytest.fixture
def transports(agent, stub):
    """Two transports (a publisher and a fetcher); the pool must be empty again afterwards."""
    pair = NodeLocalTransport(agent.address), NodeLocalTransport(agent.address)
    yield pair
    for t in pair:
        t.close()
    assert stub.Stats(ipb.StatsRequest()) == ipb.PoolStats(capacity_bytes=POOL_BYTES)


def noncontiguous(block: torch.Tensor) -> torch.Tensor:
    """The same values as `block`, as a view with other strides."""
    view = block.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(view, block) and not view.is_contiguous()
    return view


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_publish_in_one_transport_fetch_in_another(transports, stub, dtype):
    publisher, fetcher = transports
    shape = BlockShape(2, 16, 2, 8, dtype)
    blocks = random_blocks(shape, 3, seed=1)
    sent = [blocks[0], noncontiguous(blocks[1]), blocks[2]]
    handle = publisher.publish("req-1", shape, sent, num_tokens=40)
    assert (handle.num_tokens, handle.num_blocks, handle.shape) == (40, 3, shape)
    stats = stub.Stats(ipb.StatsRequest())
    assert (stats.used_bytes, stats.handles, stats.blocks) == (3 * shape.nbytes, 1, 3)

    received = handle_from_pb(ipb.KVHandle.FromString(handle_to_pb(handle).SerializeToString()))
    fetched = fetcher.fetch(received)
    assert all(torch.equal(f, b) for f, b in zip(fetched, blocks, strict=True))
    fetcher.release(received)
    fetcher.release(received)  # already released: not an error
    assert stub.Stats(ipb.StatsRequest()).used_bytes == 0


@pytest.mark.parametrize("request_fields, field", [
    (dict(block_dims=[2, 16, 2]), "block_dims"),
    (dict(block_dims=[2, 16, 2, 0]), "block_dims"),
    (dict(dtype="int8"), "dtype"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(block_dims=[64, 16, 2, 8]), "slab"),
])
def test_allocate_refuses_bad_requests(stub, request_fields, field):
    fields = dict(block_dims=[2, 16, 2, 8], dtype="float32", num_blocks=1, request_id="r") | request_fields
    with pytest.raises(grpc.RpcError) as err:
        stub.Allocate(ipb.AllocateRequest(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    assert stub.Stats(ipb.StatsRequest()).handles == 0


def test_a_full_pool_is_resource_exhausted_and_allocates_nothing(transports, stub):
    held = stub.Allocate(ipb.AllocateRequest(block_dims=[2, 16, 2, 8], dtype="float32", num_blocks=10))
    before = stub.Stats(ipb.StatsRequest())
    with pytest.raises(grpc.RpcError) as err:
        stub.Allocate(ipb.AllocateRequest(block_dims=[2, 16, 2, 8], dtype="float32", num_blocks=55))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(KVPoolFullError):
        transports[0].publish("req-big", SHAPE, random_blocks(SHAPE, 55, seed=2), num_tokens=1)
    assert stub.Stats(ipb.StatsRequest()) == before
    stub.Release(held)


def test_unknown_handles_are_not_found(transports, stub):
    for call in (stub.MarkReady, stub.Release):
        with pytest.raises(grpc.RpcError) as err:
            call(ipb.KVHandle(handle_id="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
    transports[0].release(KVHandleInfo("nope", (0,), SHAPE, 0))  # not an error for the transport


def test_mark_ready_refuses_more_tokens_than_the_blocks_hold(stub):
    h = stub.Allocate(ipb.AllocateRequest(block_dims=[2, 16, 2, 8], dtype="float32", num_blocks=2))
    assert not h.ready
    with pytest.raises(grpc.RpcError) as err:
        stub.MarkReady(ipb.KVHandle(handle_id=h.handle_id, num_tokens=33))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_tokens=33" in err.value.details()
    ready = stub.MarkReady(ipb.KVHandle(handle_id=h.handle_id, num_tokens=32))
    assert ready.ready and ready.num_tokens == 32 and list(ready.block_offsets) == list(h.block_offsets)
    assert stub.Release(h).num_blocks == 2


def test_a_failed_publish_releases_what_it_allocated(transports, stub, monkeypatch):
    publisher = transports[0]

    def broken_views(offsets, shape):
        raise ValueError("block offset 1 is not a multiple of the float32 item size (4 bytes)")
    monkeypatch.setattr(publisher.attachment, "views", broken_views)
    with pytest.raises(KVTransferError, match="does not fit the pool") as err:
        publisher.publish("req-2", SHAPE, random_blocks(SHAPE, 2, seed=3), num_tokens=20)
    assert err.value.code is None
    stats = stub.Stats(ipb.StatsRequest())
    assert (stats.used_bytes, stats.handles) == (0, 0)


def test_publish_refuses_blocks_of_another_shape(transports):
    wrong = random_blocks(BlockShape(2, 16, 2, 8, "bfloat16"), 1, seed=4)
    with pytest.raises(ValueError, match=r"blocks\[0\]"):
        transports[0].publish("req-3", SHAPE, wrong, num_tokens=1)
    with pytest.raises(ValueError, match="num_tokens=17"):
        transports[0].publish("req-3", SHAPE, random_blocks(SHAPE, 1, seed=4), num_tokens=17)


def test_make_transport_by_kind(agent):
    with pytest.raises(ValueError, match="node-local"):
        make_transport("nixl", agent.address)
    t = make_transport("node-local", agent.address)
    assert isinstance(t, NodeLocalTransport) and t.attachment.path == agent.agent.pool.path
    t.close()


def test_a_transport_without_an_agent_fails_with_its_code():
    with pytest.raises(KVTransferError) as err:
        NodeLocalTransport("127.0.0.1:1", timeout_s=2)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


# -- real processes ---------------------------------------------------------------

PUBLISHER = """
import sys, torch
from tokenpool.engine.slab_allocator import BlockShape
from tokenpool.kvtransfer.handle import handle_to_pb
from tokenpool.kvtransfer.transport import NodeLocalTransport
address, dtype, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
shape = BlockShape(2, 16, 2, 8, dtype)
g = torch.Generator().manual_seed(seed)
blocks = [torch.randn(shape.dims, generator=g).to(shape.torch_dtype) for _ in range(n)]
transport = NodeLocalTransport(address)
print(handle_to_pb(transport.publish("req-child", shape, blocks, n * 16 - 5)).SerializeToString().hex())
transport.close()
"""


def start_agent(ready_file: Path, *flags: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "tokenpool.kvtransfer", "--listen", "127.0.0.1:0",
                             "--pool-mib", "4", "--slab-mib", "1", "--ready-file", str(ready_file), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the agent did not come up (rc {proc.wait()}): {proc.stderr.read()}")
        time.sleep(0.05)
    return proc, json.loads(ready_file.read_text())


def publish_in_a_child(address: str, dtype: str, num_blocks: int, seed: int) -> KVHandleInfo:
    """The handle a separate Python process published (and exited) through the agent at address."""
    child = subprocess.run([sys.executable, "-c", PUBLISHER, address, dtype, str(num_blocks), str(seed)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    return handle_from_pb(ipb.KVHandle.FromString(bytes.fromhex(child.stdout.strip())))


def test_kv_moves_between_processes_and_the_agent_cleans_up(tmp_path):
    proc, ready = start_agent(tmp_path / "ready.json", "--name", "kvtransfer-test")
    pool_file = Path(ready["pool"])
    try:
        assert ready["name"] == "kvtransfer-test" and ready["pid"] == proc.pid
        assert pool_file.parent == shm_root() and pool_file.stat().st_mode & 0o777 == 0o600
        with grpc.insecure_channel(ready["address"]) as channel:
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            health = health_pb2_grpc.HealthStub(channel).Check(check)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # The publisher has exited by now: its blocks live only in the agent's pool file.
            handle = publish_in_a_child(ready["address"], "bfloat16", 5, seed=7)
            assert (handle.num_tokens, handle.num_blocks) == (75, 5)
            with NodeLocalTransport(ready["address"]) as fetcher:
                fetched = fetcher.fetch(handle)
                expected = random_blocks(handle.shape, 5, seed=7)
                assert all(torch.equal(f, e) for f, e in zip(fetched, expected, strict=True))
                fetcher.release(handle)
            stats = instances_pb2_grpc.KVTransferStub(channel).Stats(ipb.StatsRequest())
        assert (stats.used_bytes, stats.handles, stats.blocks) == (0, 0, 0)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 0, proc.stderr.read()
    assert not pool_file.exists()


@pytest.mark.parametrize("flags, message", [
    (["--pool-mib", "0"], "--pool-mib"),
    (["--slab-mib", "x"], "--slab-mib"),
    (["--pool-mib", "2", "--slab-mib", "4"], "--slab-mib 4 exceeds"),
    (["--handle-ttl-s", "-1"], "--handle-ttl-s"),
    (["--listen", "nowhere"], "HOST:PORT"),
])
def test_bad_flags_exit_2_with_one_error_line(flags, message):
    proc = subprocess.run([sys.executable, "-m", "tokenpool.kvtransfer", *flags],
                          capture_output=True, text=True, timeout=30)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
