"""The shared-memory request table: bookkeeping, corruption handling, and several real processes."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from stalled_lock import StalledLockHolder
from tokenpool.proxy.deferred_releases import DeferredReleases
from tokenpool.proxy.progress_reporter import ProgressReporter
from tokenpool.proxy.request_table import (
    CorruptSlotError,
    RequestRecord,
    RequestState,
    TableLockTimeout,
    TableUsage,
    make_request_table,
)
from tokenpool.proxy.shm_request_table import (
    BODY_AT,
    HEADER_BYTES,
    SEQ_AT,
    SLOT_HEADER,
    STATE_AT,
    ShmRequestTable,
    TableFormatError,
    default_root,
)
from waiting import wait_for


@pytest.fixture
def root() -> Path:
    """A private folder under the real /dev/shm root, removed afterwards."""
    path = default_root() / f"test-{uuid.uuid4().hex[:12]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def table(root: Path) -> ShmRequestTable:
    t = ShmRequestTable("t", 8, create=True, root=root)
    yield t
    t.close()
    t.unlink()


def rec(request_id: str = "req-1", **fields) -> RequestRecord:
    return RequestRecord(request_id, "llama-3-8b", **fields)


def bump(r: RequestRecord) -> RequestRecord:
    return msgspec.structs.replace(r, num_output_tokens=r.num_output_tokens + 1)


def scribble(t: ShmRequestTable, offset: int, data: bytes) -> None:
    """Overwrite bytes of the file at `offset` behind the table's back, as a stray writer would."""
    fd = os.open(t.path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def slot_at(t: ShmRequestTable, slot: int) -> int:
    return HEADER_BYTES + slot * t.slot_bytes


# ---- one process ----------------------------------------------------------------------------------
# The RequestTable contract (round trip, a full table, duplicates, record limits, update's
# contract) runs on this backend and on Redis in tests/test_redis_request_table.py.


def test_files_are_private(table: ShmRequestTable, root: Path) -> None:
    assert stat.S_IMODE(os.stat(table.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert [p.name for p in root.iterdir()] == ["t.reqtable"]  # no temp file left behind


def test_oversize_record_rejected_before_writing(table: ShmRequestTable) -> None:
    slot = table.insert(rec())
    before = table.path.read_bytes()
    huge = rec("big", prefill_instance="é" * 48, decode_instance="é" * 48, error="€" * 128)
    with pytest.raises(ValueError, match=r"encodes to \d+ bytes; a 512-byte slot holds 488"):
        table.insert(huge)
    with pytest.raises(ValueError, match="encodes to"):
        table.update(slot, lambda r: msgspec.structs.replace(r, error="€" * 128, decode_instance="é" * 48,
                                                             prefill_instance="é" * 48, model="é" * 128))
    assert table.path.read_bytes() == before


def test_attach_validates_header(table: ShmRequestTable, root: Path) -> None:
    with pytest.raises(TableFormatError, match="capacity 8 and slot_bytes 512; attached with capacity 16"):
        ShmRequestTable("t", 16, create=False, root=root)
    with pytest.raises(TableFormatError, match="slot_bytes 1024"):
        ShmRequestTable("t", 8, 1024, create=False, root=root)
    with pytest.raises(FileExistsError, match="already exists"):
        ShmRequestTable("t", 8, create=True, root=root)
    with pytest.raises(FileNotFoundError, match="create it first"):
        ShmRequestTable("missing", 8, create=False, root=root)
    scribble(table, 8, (99).to_bytes(4, sys.byteorder))
    with pytest.raises(TableFormatError, match="format version 99"):
        ShmRequestTable("t", 8, create=False, root=root)
    scribble(table, 0, b"garbage!")
    with pytest.raises(TableFormatError, match="not a request table"):
        ShmRequestTable("t", 8, create=False, root=root)


@pytest.mark.parametrize(("offset", "data", "why"), [
    (SLOT_HEADER.size + 3, b"\xff\xfe", "record checksum mismatch"),
    (BODY_AT, (1 << 31).to_bytes(4, sys.byteorder), "record length 2147483648 exceeds the slot's 488 bytes"),
    (STATE_AT, (7).to_bytes(4, sys.byteorder), "state word 0x7"),
    (SEQ_AT, (5).to_bytes(8, sys.byteorder), "a writer died mid-write"),
])
def test_corrupt_slot_is_a_clear_error(table: ShmRequestTable, offset: int, data: bytes, why: str) -> None:
    slot = table.insert(rec())
    table.insert(rec("healthy"))
    scribble(table, slot_at(table, slot) + offset, data)
    for call in (lambda: table.get(slot), lambda: table.update(slot, bump), table.records):
        with pytest.raises(CorruptSlotError, match=f"slot {slot}: {why}"):
            call()
    assert table.find("healthy") == 1 and table.usage().used == 2
    table.release(slot)  # clears it
    assert table.insert(rec()) == slot and table.get(slot) == rec()


def test_threads_and_two_handles_in_one_process(table: ShmRequestTable, root: Path) -> None:
    other = ShmRequestTable("t", 8, create=False, root=root)  # lockf locks are per process: must not mix
    slot = table.insert(rec())

    def slow_bump(r: RequestRecord) -> RequestRecord:
        time.sleep(0)  # hand the GIL over inside the critical section
        return bump(r)

    def work(t: ShmRequestTable) -> None:
        for _ in range(100):
            t.update(slot, slow_bump)

    threads = [threading.Thread(target=work, args=(t,)) for t in (table, other, table, other)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    other.close()
    assert table.get(slot).num_output_tokens == 400


def test_factory(root: Path) -> None:
    t = make_request_table("shm", name="f", capacity=2, create=True, root=root)
    assert isinstance(t, ShmRequestTable) and t.usage() == TableUsage(2, 0)
    t.close()
    with pytest.raises(ValueError, match="--redis-url"):  # tests/test_redis_request_table.py has the rest
        make_request_table("redis", url=None, name="f", capacity=2)
    with pytest.raises(ValueError, match="unknown request table kind 'etcd'"):
        make_request_table("etcd")


# ---- several processes ----------------------------------------------------------------------------

PRELUDE = """
import json, os, sys, time
from pathlib import Path
import msgspec
from tokenpool.proxy.request_table import RequestRecord, SlotFreeError
from tokenpool.proxy.shm_request_table import ShmRequestTable
table = ShmRequestTable("t", int(sys.argv[1]), create=False, root=Path(sys.argv[2]))
"""

# Shared slots keep num_output_tokens == updated_ns == len(error): a torn record would split them.
WRITER = PRELUDE + """
worker, n = int(sys.argv[3]), int(sys.argv[4])
def bump(r):
    k = r.num_output_tokens + 1
    return msgspec.structs.replace(r, num_output_tokens=k, updated_ns=k, error="x" * (k % 100))
def check_and_release(slot, rid):  # a slot handed out twice would show here
    assert table.find(rid) == slot and table.get(slot).request_id == rid, (slot, rid)
    table.release(slot)
live = []  # this worker's records: up to 3 at once, so 4 workers and the shared 4 fill all 16 slots
for i in range(n):
    for slot in range(4):
        table.update(slot, bump)
    rid = f"w{worker}-{i}"
    live.append((table.insert(RequestRecord(rid, "m", num_prompt_tokens=i, error=rid * (i % 5))), rid))
    if len(live) == 3:
        check_and_release(*live.pop(0))
for slot, rid in live:
    check_and_release(slot, rid)
"""

READER = PRELUDE + """
done, reads, frees = Path(sys.argv[3]), 0, 0
def check(slot, r):
    if slot < 4:
        assert r.num_output_tokens == r.updated_ns and len(r.error) == r.num_output_tokens % 100, r
    else:
        i = int(r.request_id.split("-")[1])
        assert r.num_prompt_tokens == i and r.error == r.request_id * (i % 5), r
while not done.exists():
    # updates never make a live slot look free or its record unfindable, even for an instant
    assert table.usage().used >= 4 and [table.find(f"shared-{s}") for s in range(4)] == [0, 1, 2, 3]
    for slot in range(table.capacity):
        try:
            check(slot, table.get(slot))
            reads += 1
        except SlotFreeError:
            frees += 1
print(json.dumps({"reads": reads, "frees": frees}))
"""

HOLDER = PRELUDE + """
def hold(r):
    print("holding", flush=True)
    time.sleep(60)
    return r
table.update(0, hold)
"""


def spawn(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(60)  # a wedged lock fails here instead of hanging the suite
def test_processes_hammering_lose_no_update_and_never_tear(root: Path) -> None:
    n, workers = 500, 4
    table = ShmRequestTable("t", 16, create=True, root=root)
    for slot in range(4):
        assert table.insert(rec(f"shared-{slot}")) == slot
    done = root / "done"
    reader = spawn(READER, 16, root, done)
    procs = [spawn(WRITER, 16, root, w, n) for w in range(workers)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    done.touch()
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    assert json.loads(out)["reads"] > 0
    assert [table.get(s).num_output_tokens for s in range(4)] == [workers * n] * 4
    assert table.usage().used == 4
    table.close()


@pytest.mark.timeout(60)  # a wedged lock fails here instead of hanging the suite
def test_killed_lock_holder_does_not_wedge_the_table(root: Path) -> None:
    table = ShmRequestTable("t", 4, create=True, root=root)
    table.insert(rec())
    holder = spawn(HOLDER, 4, root)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert slot_lock_is_held(table, 0)
        assert table.get(0) == rec()  # readers never wait on a writer inside fn
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        holder.kill()
        holder.communicate()
    assert table.update(0, bump).num_output_tokens == 1
    table.close()


@pytest.mark.timeout(60)  # a wedged lock fails here instead of hanging the suite
def test_a_stalled_lock_holder_costs_a_timeout_not_a_wedge_and_its_row_ends_after_it(root: Path) -> None:
    """A process stopped inside a row's lock (as an instance SIGSTOPped while reporting progress):
    that row's writes raise TableLockTimeout instead of blocking; other rows, allocation and reads
    go on; progress for other rows is written; the row's end waits in DeferredReleases and is
    written once the holder dies."""
    table = ShmRequestTable("t", 4, create=True, root=root)
    slot, other = table.insert(rec()), table.insert(rec("req-2"))
    holder = spawn(HOLDER, 4, root)
    reporter = releases = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGSTOP)  # stalled inside slot 0's lock
        with pytest.raises(TableLockTimeout, match="slot 0 stayed locked by another process"):
            table.update(slot, bump)
        with pytest.raises(TableLockTimeout):
            table.release(slot)
        assert table.update(other, bump).num_output_tokens == 1
        third = table.insert(rec("req-3"))
        assert table.get(slot) == rec() and [s for s, _ in table.records()] == [0, 1, 2]
        reporter = ProgressReporter(lambda: table, close_table=False)
        reporter.report(slot, "req-1", num_output_tokens=7)
        reporter.report(other, "req-2", num_output_tokens=9)
        wait_for(lambda: table.get(other).num_output_tokens == 9)  # not held up behind slot 0
        releases = DeferredReleases(table)
        releases.end(third, RequestState.FINISHED)  # not locked: at once
        releases.end(slot, RequestState.FINISHED)
        assert releases.pending() == 1 and table.usage().used == 2
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        wait_for(lambda: releases.pending() == 0)
        assert table.usage().used == 1 and table.find("req-1") is None
    finally:
        holder.kill()
        holder.communicate()
        for closer in (reporter, releases):
            if closer is not None:
                closer.close()
    table.close()


@pytest.mark.timeout(60)
def test_a_release_waiting_on_a_stalled_slot_holds_up_no_admission_and_admissions_pass_a_locked_free_slot(
        root: Path) -> None:
    """Nothing is held while waiting: a release of a row whose lock a stopped process holds gives up
    after the timeout changing nothing, admissions go on beside it from another thread, and an
    admission passes over a free slot whose lock a stopped process holds."""
    table = ShmRequestTable("t", 4, create=True, root=root)
    stuck = table.insert(rec("stuck"))
    lockers = [StalledLockHolder(table.path) for _ in range(2)]
    try:
        for locker, slot in zip(lockers, (stuck, 1), strict=True):
            locker.lock(slot_at(table, slot), table.slot_bytes)
        failed = []

        def release() -> None:
            try:
                table.release(stuck)
            except TableLockTimeout as exc:
                failed.append(exc)

        releasing = threading.Thread(target=release)
        releasing.start()
        admitted = [table.insert(rec(f"meanwhile-{i}")) for i in range(2)]  # never slot 1: locked
        releasing.join()
        assert failed and sorted(admitted) == [2, 3]
        assert table.get(stuck).request_id == "stuck"  # nothing changed
        with pytest.raises(TableLockTimeout, match="every free slot is locked"):
            table.insert(rec("no-slot-to-take"))  # slot 1, the only free one, is held
    finally:
        for locker in lockers:
            locker.kill()
    table.release(stuck)
    assert table.insert(rec("after")) in (0, 1)
    table.close()


def slot_lock_is_held(table: ShmRequestTable, slot: int) -> bool:
    """Probe through a separate descriptor (this process holds no lock on the file right now)."""
    fd = os.open(table.path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, table.slot_bytes, slot_at(table, slot))
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
