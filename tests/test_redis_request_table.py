"""The Redis request table: the RequestTable contract on both backends, several clients sharing
one server, capacity and fencing under concurrency, and a dead owner's rows reclaimed.

Each test module run starts its own redis-server on 127.0.0.1 (a free port, no persistence)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import msgspec
import pytest
from redis_server import redis_server
from test_request_table import bump, rec
from tokenpool.proxy.request_table import (
    CorruptSlotError,
    DuplicateRequestError,
    RequestRecord,
    RequestState,
    SlotFreeError,
    TableFencedError,
    TableFullError,
    TableUsage,
    make_request_table,
)
from tokenpool.proxy.shm_request_table import ShmRequestTable, default_root
from tokenpool.proxy.table_recovery import orphans, reclaim_orphans

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> str:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def redis_table(url: str, name: str, capacity: int = 8, **kw):
    return make_request_table("redis", url=url, name=name, capacity=capacity, **kw)


@pytest.fixture
def name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["shm", "redis"])
def table(request, name: str):
    """An empty 8-slot table of either backend."""
    if request.param == "shm":
        root = default_root() / f"test-{name}"
        t = ShmRequestTable("t", 8, create=True, root=root)
        yield t
        t.close()
        shutil.rmtree(root, ignore_errors=True)
    else:
        t = redis_table(request.getfixturevalue("redis_url"), name)
        yield t
        t.unlink()
        t.close()


# ---- the RequestTable contract, on both backends ------------------------------------------------


def test_round_trip(table) -> None:
    r = rec(state=RequestState.PREFILLING, prefill_instance="p0", num_prompt_tokens=12, created_ns=5)
    slot = table.insert(r)
    assert table.get(slot) == r and table.find("req-1") == slot and table.find("nope") is None
    new = table.update(slot, lambda x: msgspec.structs.replace(x, state=RequestState.DECODING,
                                                               decode_instance="d1", num_output_tokens=3))
    assert table.get(slot) == new and new.state is RequestState.DECODING
    assert table.records() == [(slot, new)] and table.usage() == TableUsage(8, 1)
    table.release(slot)
    assert table.usage().used == 0 and table.find("req-1") is None and table.records() == []
    with pytest.raises(SlotFreeError, match="free"):
        table.get(slot)
    with pytest.raises(SlotFreeError, match="already free"):
        table.release(slot)
    with pytest.raises(IndexError, match="out of range"):
        table.get(8)


def test_full_table_fails_at_once(table) -> None:
    assert sorted(table.insert(rec(f"r{i}")) for i in range(8)) == list(range(8))
    start = time.monotonic()
    with pytest.raises(TableFullError, match="all 8 slots"):
        table.insert(rec("one-too-many"))
    assert time.monotonic() - start < 0.5
    table.release(3)
    assert table.insert(rec("one-too-many")) == 3


def test_duplicate_request_id(table) -> None:
    table.insert(rec("dup"))
    with pytest.raises(DuplicateRequestError, match="dup"):
        table.insert(rec("dup", num_prompt_tokens=1))
    assert table.usage().used == 1


def test_record_limits_and_update_contract(table) -> None:
    with pytest.raises(ValueError, match="length <= 64 - at request_id"):
        table.insert(rec("x" * 65))
    with pytest.raises(ValueError, match=">= 0 - at num_output_tokens"):
        table.insert(rec(num_output_tokens=-1))
    worst = RequestRecord("x" * 64, "m" * 128, RequestState.TRANSFERRING, "p" * 48, "d" * 48, 2**32 - 1,
                          2**32 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1, "e" * 128)
    slot = table.insert(worst)
    with pytest.raises(ValueError, match="changed request_id"):
        table.update(slot, lambda r: msgspec.structs.replace(r, request_id="other"))
    with pytest.raises(ZeroDivisionError):
        table.update(slot, lambda r: 1 / 0)
    assert table.get(slot) == worst and table.usage().used == 1


def test_threads_lose_no_update(table) -> None:
    slot = table.insert(rec())

    def work() -> None:
        for _ in range(100):
            table.update(slot, bump)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert table.get(slot).num_output_tokens == 400


# ---- Redis only ---------------------------------------------------------------------------------


def test_corrupt_value_is_a_clear_error_and_release_clears_it(redis_url: str, name: str) -> None:
    import redis

    with redis_table(redis_url, name) as t:
        slot = t.insert(rec())
        redis.Redis.from_url(redis_url).hset(f"tokenpool:{{{name}}}:slot:{slot}", "rec", b"\xc1garbage")
        for call in (lambda: t.get(slot), lambda: t.update(slot, bump), t.records):
            with pytest.raises(CorruptSlotError, match=f"slot {slot}: the stored bytes are not a request"):
                call()
        t.release(slot)
        assert t.insert(rec()) == slot and t.get(slot) == rec()
        t.unlink()


def test_two_clients_share_one_table(redis_url: str, name: str) -> None:
    with redis_table(redis_url, name) as a, redis_table(redis_url, name) as b:
        slot = a.insert(rec("seen-by-b"))
        assert b.find("seen-by-b") == slot and b.get(slot) == rec("seen-by-b")
        b.update(slot, bump)
        assert a.get(slot).num_output_tokens == 1 and a.usage() == b.usage() == TableUsage(8, 1)
        with pytest.raises(DuplicateRequestError):
            b.insert(rec("seen-by-b"))
        with pytest.raises(PermissionError, match="belongs to a live proxy"):
            b.release(slot)  # fencing: only a live row's owner frees it
        a.release(slot)
        assert b.records() == []
        with pytest.raises(ValueError, match="capacity 8; attached with capacity 16.*--table-slots"):
            redis_table(redis_url, name, capacity=16)
        a.unlink()


def test_capacity_holds_under_concurrent_inserts(redis_url: str, name: str) -> None:
    clients = [redis_table(redis_url, name, capacity=16) for _ in range(4)]
    got: list[int] = []
    full = []

    def work(t, k: int) -> None:
        for i in range(10):
            try:
                got.append(t.insert(rec(f"c{k}-{i}")))
            except TableFullError:
                full.append(k)

    threads = [threading.Thread(target=work, args=(t, k)) for k, t in enumerate(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(got) == list(range(16)) and len(full) == 24, "every slot handed out exactly once"
    assert clients[0].usage() == TableUsage(16, 16)
    clients[0].unlink()
    for t in clients:
        t.close()


def test_updates_from_several_clients_lose_nothing(redis_url: str, name: str) -> None:
    clients = [redis_table(redis_url, name) for _ in range(4)]
    slot = clients[0].insert(rec())
    threads = [threading.Thread(target=lambda t=t: [t.update(slot, bump) for _ in range(100)])
               for t in clients]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert clients[1].get(slot).num_output_tokens == 400
    clients[0].unlink()
    for t in clients:
        t.close()


def test_a_lapsed_client_is_fenced_and_its_rows_reclaimed(redis_url: str, name: str) -> None:
    hung = redis_table(redis_url, name, ttl_s=0.3)
    survivor = redis_table(redis_url, name)
    slot = hung.insert(rec("hung-1"))
    hung._stop.set()  # a process frozen (SIGSTOP, a long pause): its heartbeat stops
    hung._heartbeat.join()
    assert orphans(survivor) == []
    time.sleep(0.5)
    assert orphans(survivor) == [(slot, rec("hung-1"))]
    assert asyncio.run(reclaim_orphans(survivor, [], 1)) == 1
    new = survivor.insert(rec("new-request"))
    assert new == slot, "the reclaimed slot goes to another request"
    for write in (lambda: hung.update(slot, bump), lambda: hung.release(slot),
                  lambda: hung.insert(rec("late"))):
        with pytest.raises(TableFencedError, match="heartbeat .* lapsed"):
            write()  # it wakes up: it must not touch the slot now holding another request
    assert survivor.get(slot) == rec("new-request") and survivor.usage().used == 1
    survivor.unlink()
    survivor.close()


def test_fenced_is_false_on_shm_and_set_once_a_redis_heartbeat_lapses(table) -> None:
    assert table.fenced is False
    if isinstance(table, ShmRequestTable):
        return  # no heartbeat: never fenced
    table._redis.delete(table._alive_key(table.owner))  # as a Redis restarted empty would
    deadline = time.monotonic() + table.ttl_s + 5  # the next beat finds its key gone
    while not table.fenced:
        assert time.monotonic() < deadline, "the heartbeat never noticed its key was gone"
        time.sleep(0.05)
    with pytest.raises(TableFencedError, match="retry on another proxy"):
        table.insert(rec("after-the-fence"))


def test_a_write_refused_by_the_fence_sets_fenced_too(redis_url: str, name: str) -> None:
    t = redis_table(redis_url, name, ttl_s=60)  # no beat comes before the write
    try:
        t._redis.delete(t._alive_key(t.owner))
        assert t.fenced is False
        with pytest.raises(TableFencedError):
            t.insert(rec("late"))
        assert t.fenced is True
    finally:
        t.unlink()
        t.close()


def test_a_client_cut_off_from_redis_fences_itself_once_its_key_may_have_lapsed(tmp_path, name: str) -> None:
    """Redis frozen (SIGSTOP: calls get no reply, so no beat can find its key gone): a pause shorter
    than the ttl is ridden out; a longer one fences the client once ttl_s has passed since its last
    renewal got through, before the others could see its key expire and reclaim its rows."""
    import os

    import redis
    from tokenpool.proxy.redis_request_table import HEARTBEATS_PER_TTL, SOCKET_TIMEOUT_S

    with redis_server(tmp_path) as url:
        pid = redis.Redis.from_url(url).info()["process_id"]
        t = redis_table(url, name, ttl_s=4.0)
        interval = t.ttl_s / HEARTBEATS_PER_TTL
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.5)
            os.kill(pid, signal.SIGCONT)
            time.sleep(3 * interval)
            assert t.fenced is False, "a pause shorter than the ttl fenced the client"
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            while not t.fenced:
                assert time.monotonic() < stopped + t.ttl_s + SOCKET_TIMEOUT_S + 3, "never fenced itself"
                time.sleep(0.05)
            # Not on the first failed beat: only once the last renewal (at most one interval before
            # the stop) is ttl_s old.
            assert time.monotonic() - stopped >= t.ttl_s - interval - 0.05
        finally:
            os.kill(pid, signal.SIGCONT)
        with pytest.raises(TableFencedError):
            t.insert(rec("after-the-fence"))
        t.unlink()
        t.close()


def test_a_row_whose_end_finds_redis_frozen_is_ended_once_it_answers(tmp_path, name: str) -> None:
    """The proxy ends a request (terminal state, release) through DeferredReleases, which makes a
    remote table's calls from its thread (never the event loop's): with Redis frozen they fail
    after the socket timeout and are tried again, and the row is released once Redis answers,
    instead of staying used for good."""
    import os

    import redis
    from tokenpool.proxy.deferred_releases import DeferredReleases
    from tokenpool.proxy.redis_request_table import SOCKET_TIMEOUT_S
    from tokenpool.proxy.request_table import RequestState

    with redis_server(tmp_path) as url:
        pid = redis.Redis.from_url(url).info()["process_id"]
        t = redis_table(url, name, ttl_s=30.0)
        slot = t.insert(rec("ending"))
        releases = DeferredReleases(t)
        try:
            os.kill(pid, signal.SIGSTOP)
            releases.end(slot, RequestState.FINISHED)  # at once: the thread calls
            assert releases.pending() == 1
            time.sleep(SOCKET_TIMEOUT_S + 0.5)  # the thread's first call has failed meanwhile
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while releases.pending():
            assert time.monotonic() < deadline, "the deferred row was never ended"
            time.sleep(0.05)
        assert t.usage().used == 0 and t.find("ending") is None
        releases.close()
        t.unlink()
        t.close()


OWNER = """
import sys, time
from tokenpool.proxy.request_table import RequestRecord, make_request_table
t = make_request_table("redis", url=sys.argv[1], name=sys.argv[2], capacity=8, ttl_s=0.5)
for i in range(3):
    t.insert(RequestRecord(f"dead-{i}", "m", proxy_pid=12345))
print("inserted", flush=True)
time.sleep(60)
"""


def test_a_killed_owners_rows_are_reclaimed_by_a_survivor(redis_url: str, name: str) -> None:
    survivor = redis_table(redis_url, name)
    kept = survivor.insert(rec("alive"))
    owner = subprocess.Popen([sys.executable, "-c", OWNER, redis_url, name], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert owner.stdout.readline().strip() == "inserted"
        assert survivor.usage().used == 4 and asyncio.run(reclaim_orphans(survivor, [], 1)) == 0
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
    finally:
        owner.kill()
        owner.communicate()
    deadline = time.monotonic() + 5
    while asyncio.run(reclaim_orphans(survivor, [], 1)) == 0:
        assert time.monotonic() < deadline, "the dead owner's rows were never reclaimed"
        time.sleep(0.1)
    assert survivor.records() == [(kept, rec("alive"))], "exactly the dead owner's rows, no live one's"
    survivor.unlink()
    survivor.close()


def test_proxy_flags_select_the_backend() -> None:
    from tokenpool.proxy.__main__ import build_parser

    args = build_parser().parse_args(["--prefill", "p=h:1", "--decode", "d=h:2", "--kvtransfer", "h:3",
                                      "--model", "m", "--table-backend", "redis",
                                      "--redis-url", "redis://127.0.0.1:6379/0", "--table", "shared"])
    assert (args.table_backend, args.redis_url, args.table) == ("redis", "redis://127.0.0.1:6379/0", "shared")
    assert build_parser().parse_args(["--prefill", "p=h:1", "--decode", "d=h:2", "--kvtransfer", "h:3",
                                      "--model", "m"]).table_backend == "shm"
    with pytest.raises(ValueError, match="--redis-url"):
        make_request_table("redis", url=None, name="x", capacity=2)
