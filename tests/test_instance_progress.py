"""Instances' progress in the proxies' request table (ProgressReporter, touch_record) on both backends:
reports land once the table exists, a late write never resurrects a row a proxy reclaimed nor
clobbers the request that took its slot, and an unreachable Redis never holds up report().

Redis: one redis-server on 127.0.0.1 for the module (tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid

import msgspec
import pytest
import redis
from prometheus_client import CollectorRegistry
from redis_server import redis_server
from test_request_table import rec
from tokenpool.proxy.progress_reporter import ProgressReporter
from tokenpool.proxy.redis_request_table import SOCKET_TIMEOUT_S, RedisRequestTable
from tokenpool.proxy.request_table import (
    RequestState,
    SlotFreeError,
    TableNotFoundError,
    make_request_table,
    touch_record,
)
from tokenpool.proxy.shm_request_table import ShmRequestTable, default_root
from tokenpool.proxy.table_recovery import reclaim_orphans

pytestmark = pytest.mark.timeout(60)

FLUSH_S = 20.0  # a loopback write takes milliseconds; this only bounds a failure


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> str:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


class Backend:
    """A proxy's table (owner) and what an instance attaches, on one backend."""

    def __init__(self, kind: str, name: str, url: str | None) -> None:
        self.kind, self.name, self.url = kind, name, url
        self.root = default_root() / f"test-{name}"
        self.owners = []

    def proxy(self, capacity: int = 4):
        """A proxy's table: makes it the first time, attaches after."""
        if self.kind == "shm":
            if (self.root / "t.reqtable").exists():
                table = ShmRequestTable.attach("t", root=self.root)
            else:
                table = make_request_table("shm", name="t", capacity=capacity, create=True, root=self.root)
        else:
            table = make_request_table("redis", url=self.url, name=self.name, capacity=capacity)
        self.owners.append(table)
        return table

    def attach(self):
        """As an instance does (make_request_table(..., attach=True))."""
        if self.kind == "shm":
            return make_request_table("shm", attach=True, name="t", root=self.root)
        return make_request_table("redis", attach=True, url=self.url, name=self.name)

    def admitted(self, table, request_id: str) -> int:
        """A row as a proxy admits it; on shm its owner is a process that has already exited, so
        the row is an orphan as soon as its 'proxy' stops counting as alive."""
        pid = os.getpid() if self.kind == "redis" else dead_pid()
        return table.insert(rec(request_id, proxy_pid=pid))

    def proxy_dies(self, table) -> None:
        """Redis: the owner's heartbeat key goes (as after a lapse); shm: its pid is already gone."""
        if self.kind == "redis":
            table.close()

    def close(self) -> None:
        for table in self.owners:
            if self.kind == "redis" and table.is_owner:
                table.unlink()
            table.close()
        shutil.rmtree(self.root, ignore_errors=True)


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


@pytest.fixture(params=["shm", "redis"])
def backend(request):
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    b = Backend(request.param, f"p-{uuid.uuid4().hex[:10]}", url)
    yield b
    b.close()


def reporter(backend: Backend, registry=None) -> ProgressReporter:
    return ProgressReporter(backend.attach, registry, name=backend.name)


def reports(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("tokenpool_table_reports_total", {"outcome": outcome}) or 0.0


def test_reports_made_before_the_table_exists_land_once_a_proxy_makes_it(backend: Backend) -> None:
    registry = CollectorRegistry()
    progress = reporter(backend, registry)  # instances start before the proxy
    try:
        with pytest.raises(FileNotFoundError):
            backend.attach()
        table = backend.proxy()
        slot = backend.admitted(table, "r1")
        progress.report(slot, "r1", state=RequestState.PREFILLING, prefill_instance="prefill-0")
        progress.report(slot, "r1", state=RequestState.TRANSFERRING)  # merged with the one before
        assert progress.flush(FLUSH_S)
        row = table.get(slot)
        assert (row.state, row.prefill_instance) == (RequestState.TRANSFERRING, "prefill-0")
        assert reports(registry, "written") >= 1 and reports(registry, "failed") == 0
    finally:
        progress.close()


def test_a_late_write_after_a_proxy_reclaimed_the_row_does_not_resurrect_it(backend: Backend) -> None:
    registry = CollectorRegistry()
    doomed, survivor = backend.proxy(), backend.proxy()
    progress = reporter(backend, registry)
    try:
        slot = backend.admitted(doomed, "r1")
        progress.report(slot, "r1", state=RequestState.DECODING, decode_instance="decode-0")
        assert progress.flush(FLUSH_S) and survivor.get(slot).decode_instance == "decode-0"
        backend.proxy_dies(doomed)
        assert asyncio.run(reclaim_orphans(survivor, [], 1)) == 1
        gone = reports(registry, "gone")
        progress.report(slot, "r1", num_output_tokens=7)  # the instance had not heard yet
        assert progress.flush(FLUSH_S) and reports(registry, "gone") == gone + 1
        assert survivor.find("r1") is None and survivor.usage().used == 0
        with pytest.raises(SlotFreeError):
            survivor.get(slot)
        # The slot goes to the next request; the dead request's late writes leave it as it was.
        assert backend.admitted(survivor, "r2") == slot
        taken = survivor.get(slot)
        progress.report(slot, "r1", state=RequestState.DECODING, decode_instance="decode-9",
                        num_output_tokens=8)
        assert progress.flush(FLUSH_S) and survivor.get(slot) == taken
    finally:
        progress.close()


def test_a_write_racing_the_reclaim_finds_the_slot_free_and_writes_nothing(redis_url: str) -> None:
    """The compare-and-set on the slot's version: a release between the instance's read and its write
    turns the write into a re-read, which finds the slot free."""
    name = f"race-{uuid.uuid4().hex[:8]}"
    doomed, survivor = (RedisRequestTable(redis_url, name, 4) for _ in range(2))
    instance = RedisRequestTable.attach(redis_url, name)
    try:
        slot = doomed.insert(rec("r1"))
        doomed.close()
        calls = []

        def late(record):
            if not calls:
                survivor.release(slot)  # the reclaim lands while the instance's write is in flight
            calls.append(record)
            return msgspec.structs.replace(record, num_output_tokens=9)

        with pytest.raises(SlotFreeError):
            instance.update(slot, late)
        assert len(calls) == 1 and survivor.usage().used == 0 and survivor.find("r1") is None
        assert not touch_record(instance, slot, "r1", num_output_tokens=10)
    finally:
        instance.close()
        survivor.unlink()
        survivor.close()


def test_a_reporter_owns_nothing_and_is_never_fenced(redis_url: str) -> None:
    name = f"rep-{uuid.uuid4().hex[:8]}"
    with pytest.raises(TableNotFoundError, match=f"no request table '{name}'"):
        RedisRequestTable.attach(redis_url, name)
    proxy = RedisRequestTable(redis_url, name, 4, ttl_s=0.5)
    instance = RedisRequestTable.attach(redis_url, name)
    admin = redis.Redis.from_url(redis_url)
    try:
        assert instance.capacity == 4 and not instance.is_owner
        assert len(list(admin.scan_iter(match=f"{proxy.prefix}alive:*"))) == 1  # the proxy's only
        slot = proxy.insert(rec("r1"))
        with pytest.raises(PermissionError, match="may not insert"):
            instance.insert(rec("r2"))
        with pytest.raises(PermissionError, match="may not release"):
            instance.release(slot)
        time.sleep(1.0)  # the instance has no heartbeat to lapse; the proxy's keeps beating
        assert touch_record(instance, slot, "r1", decode_instance="decode-0")
        assert proxy.get(slot).decode_instance == "decode-0"
    finally:
        instance.close()
        proxy.unlink()
        proxy.close()
        admin.close()


def test_terminal_rows_are_left_alone_and_a_late_earlier_stage_does_not_move_the_state_back(tmp_path):
    with ShmRequestTable("t", 4, create=True, root=tmp_path) as table:
        slot = table.insert(rec("r1", state=RequestState.DECODING, num_output_tokens=3))
        assert touch_record(table, slot, "r1", state=RequestState.TRANSFERRING, prefill_instance="p0")
        assert (table.get(slot).state, table.get(slot).prefill_instance) == (RequestState.DECODING, "p0")
        assert touch_record(table, slot, "r1~1", state=RequestState.PREFILLING)  # a re-dispatch starts over
        assert table.get(slot).state is RequestState.PREFILLING
        table.update(slot, lambda r: msgspec.structs.replace(r, state=RequestState.CANCELLED))
        ended = table.get(slot)
        assert not touch_record(table, slot, "r1", state=RequestState.DECODING, num_output_tokens=4)
        assert table.get(slot) == ended


def test_an_unreachable_redis_never_holds_up_report_and_the_writes_land_after(redis_url: str) -> None:
    """CLIENT PAUSE stops the server answering anyone for longer than the client's socket timeout."""
    name = f"pause-{uuid.uuid4().hex[:8]}"
    proxy = RedisRequestTable(redis_url, name, 8)
    registry = CollectorRegistry()
    progress = ProgressReporter(lambda: RedisRequestTable.attach(redis_url, name), registry, name=name)
    admin = redis.Redis.from_url(redis_url)
    try:
        slots = [proxy.insert(rec(f"r{i}")) for i in range(4)]
        progress.report(slots[0], "r0", decode_instance="decode-0")
        assert progress.flush(FLUSH_S)  # attached and writing
        pause_s = SOCKET_TIMEOUT_S + 3
        admin.execute_command("CLIENT", "PAUSE", int(pause_s * 1000), "ALL")
        paused = time.monotonic()
        for n in range(1, 201):  # an instance's reports during the outage: none may wait on Redis
            for i, slot in enumerate(slots):
                progress.report(slot, f"r{i}", num_output_tokens=n)
        assert time.monotonic() - paused < 0.5 * SOCKET_TIMEOUT_S, "report() waited on Redis"
        deadline = paused + pause_s + 30
        while not reports(registry, "failed"):  # the writer's call timed out: counted, to be retried
            assert time.monotonic() < deadline, "no failed write was counted"
            time.sleep(0.05)
        time.sleep(max(0.0, paused + pause_s - time.monotonic()))  # our own reads would time out until then
        while not all(proxy.get(s).num_output_tokens == 200 for s in slots):
            assert time.monotonic() < deadline, proxy.records()
            time.sleep(0.1)
        assert reports(registry, "dropped") == 0
    finally:
        progress.close()
        proxy.unlink()
        proxy.close()
        admin.close()
