"""ShmRequestTable: the node's RequestTable in one shared-memory file.

Every process on the node (proxy workers, instances) maps <root>/<name>.reqtable
(root: /dev/shm/tokenpool-<uid>, mode 0700; the file 0600) MAP_SHARED. No daemon: the
mapping, the kernel's byte-range locks and a seqlock per slot are the whole protocol.

    | header (64 B) | slot 0 | slot 1 | ... | slot capacity-1 |      slot i at 64 + i * slot_bytes

    header: magic "TPREQTB\\0" (8) | version u32 | capacity u32 | slot_bytes u32 | zeros

    slot:   0       4        8              16       20      24                       slot_bytes
            | state | id_crc | seq          | length | crc32 | record (msgpack) ...   |
            state   0 free, 1 used                   } written only by insert and release, so
            id_crc  crc32 of request_id (never 0)     } scans may read them without the seqlock
            seq     seqlock: odd while a writer copies, +2 per write
            length  record bytes, at most slot_bytes - 24; crc32 covers them

Locks (fcntl.lockf on byte ranges; the kernel drops a dead process's):
    header range   insert and release (slot allocation, the duplicate check)
    slot range     every write of that slot; taken after the header range, never before
A live holder keeps a range for microseconds, but a stopped or hung one (SIGSTOP, a debugger, a
swap storm) keeps it as long as it is stopped: every lock is taken without blocking, tried again
for LOCK_TIMEOUT_S, then TableLockTimeout, so no caller (the proxy's event loop least of all)
waits on another process's stall for longer than that. The ranges an operation needs are taken
all at once or not at all, so nothing is held while waiting (release does not sit on the
allocation lock while a stalled process holds its slot), and insert passes over a free slot
whose lock is held.
Readers take no lock: they retry while seq is odd or moves, then read once under the slot
lock. Under the lock an odd seq means a writer died mid-copy: CorruptSlotError until
release() clears the slot. Integers are native-endian: the file never leaves the node.

Words are written by slice assignment of packed bytes (one memcpy), never struct.pack_into:
pack_into zero-fills its target before packing, so a scan would see a used slot's state as
free for an instant and hand the slot out twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import secrets
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec
from tokenpool.engine.polling import poll
from tokenpool.engine.private_shm import private_dir, reserve, shm_root
from tokenpool.proxy.request_table import (
    CorruptSlotError,
    DuplicateRequestError,
    RequestRecord,
    RequestTable,
    SlotFreeError,
    TableFullError,
    TableLockTimeout,
    TableUsage,
    decode_record,
    encode_record,
)

MAGIC = b"TPREQTB\x00"
FORMAT_VERSION = 1
HEADER_BYTES = 64
HEADER = struct.Struct("=8sIII")  # magic, version, capacity, slot_bytes
SLOT_HEADER = struct.Struct("=IIQII")  # state, id_crc, seq, length, crc32
OWNER = struct.Struct("=II")  # state, id_crc
SEQ = struct.Struct("=Q")
BODY = struct.Struct("=II")  # length, crc32
STATE_AT, ID_CRC_AT, SEQ_AT, BODY_AT = 0, 4, 8, 16  # byte offsets in a slot
FREE, USED = 0, 1
MAX_CAPACITY = 1 << 20
MAX_SLOT_BYTES = 1 << 16
SPIN_READS = 16  # lock-free attempts before a reader waits on the slot lock
LOCK_TIMEOUT_S = 0.5  # how long a lock is tried for before TableLockTimeout
LOCK_PAUSE_S = (0.0002, 0.01)  # first and longest pause between tries

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TableFormatError(ValueError):
    """The file is not a request table of the expected version and geometry; nothing was mapped."""


class _Slot(NamedTuple):
    state: int
    id_crc: int
    seq: int
    length: int
    crc: int
    payload: bytes


class ShmRequestTable(RequestTable):
    """A RequestTable of `capacity` fixed-size slots in shared memory.

    create=True makes a new table (FileExistsError if one exists; the creator unlinks it);
    create=False attaches, and TableFormatError if capacity or slot_bytes differ from the file's.
    Safe for any number of processes and threads. update()'s fn must not call the table.
    """

    def __init__(self, name: str, capacity: int, slot_bytes: int = 512, *, create: bool,
                 root: Path | None = None) -> None:
        _check_geometry(capacity, slot_bytes)
        self.capacity, self.slot_bytes = capacity, slot_bytes
        self.path = _table_path(name, root)
        self._mm: mmap.mmap | None = None
        header = HEADER.pack(MAGIC, FORMAT_VERSION, capacity, slot_bytes)
        fd = _create_file(self.path, self._file_bytes, header) if create else _open_file(self.path)
        try:
            self._check_header(fd)
            self._mm = mmap.mmap(fd, self._file_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._lock = _process_lock(fd)

    @classmethod
    def attach(cls, name: str, root: Path | None = None) -> ShmRequestTable:
        """Attach an existing table, taking its geometry from the file's header."""
        path = _table_path(name, root)
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
        if len(raw) < HEADER.size:
            raise TableFormatError(f"{path} is too short to be a request table")
        magic, version, capacity, slot_bytes = HEADER.unpack(raw)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise TableFormatError(f"{path} is not a version {FORMAT_VERSION} request table")
        return cls(name, capacity, slot_bytes, create=False, root=root)

    @property
    def _file_bytes(self) -> int:
        return HEADER_BYTES + self.capacity * self.slot_bytes

    @property
    def _payload_cap(self) -> int:
        return self.slot_bytes - SLOT_HEADER.size

    # ---- RequestTable ---------------------------------------------------------------------------

    def insert(self, record: RequestRecord) -> int:
        payload = self._fitting(encode_record(record))
        with self._locked((0, HEADER_BYTES)):
            if self.find(record.request_id) is not None:
                raise DuplicateRequestError(f"request {record.request_id!r} is already in {self.path}")
            for slot in self._free_slots():
                off = self._offset(slot)
                if self._try_range(off, self.slot_bytes):  # else a stalled process holds it: the next
                    try:
                        self._write(off, payload, owner=(USED, _id_crc(record.request_id)))
                    finally:
                        self._unlock(((off, self.slot_bytes),))
                    return slot
        raise TableLockTimeout(f"request table {self.path}: every free slot is locked by another process "
                               f"(stopped or hung?)")

    def get(self, slot: int) -> RequestRecord:
        off = self._offset(slot)
        for _ in range(SPIN_READS):
            fields = self._read_stable(off)
            if fields is not None and self._intact(fields):
                return self._decode(slot, fields)
            os.sched_yield()  # a writer is mid-copy: let it finish
        with self._locked((off, self.slot_bytes)):  # no live writer is mid-copy now
            return self._decode(slot, self._read(off))

    def find(self, request_id: str) -> int | None:
        """Scans the slots' id_crc words; a corrupt or just-released candidate is skipped."""
        target, ids, slot = _id_crc(request_id), self._column(ID_CRC_AT // 4), -1
        while True:
            try:
                slot = ids.index(target, slot + 1)  # C-level scan: a few thousand slots in microseconds
            except ValueError:
                return None
            with contextlib.suppress(SlotFreeError, CorruptSlotError, TableLockTimeout):
                if self.get(slot).request_id == request_id:
                    return slot

    def update(self, slot: int, fn: Callable[[RequestRecord], RequestRecord]) -> RequestRecord:
        off = self._offset(slot)
        with self._locked((off, self.slot_bytes)):
            fields = self._read(off)
            old = self._decode(slot, fields)
            new = fn(old)
            payload = self._fitting(encode_record(new))
            if new.request_id != old.request_id:
                raise ValueError(f"update of slot {slot} changed request_id {old.request_id!r} "
                                 f"to {new.request_id!r}; insert a new record instead")
            self._write(off, payload)
        return new

    def release(self, slot: int) -> None:
        off = self._offset(slot)
        with self._locked((0, HEADER_BYTES), (off, self.slot_bytes)):
            fields = self._read(off)
            if fields.state == FREE and fields.seq % 2 == 0:
                raise SlotFreeError(f"request table {self.path}: slot {slot} is already free")
            self._write(off, b"", owner=(FREE, 0))

    def usage(self) -> TableUsage:
        """Slots not free count as used, corrupt ones included (they hold a slot until released)."""
        return TableUsage(self.capacity, self.capacity - self._column(STATE_AT // 4).count(FREE))

    def records(self) -> list[tuple[int, RequestRecord]]:
        """CorruptSlotError (naming the slot) if a used slot does not decode; a slot a stalled
        writer holds mid-copy is left out."""
        out = []
        for slot, state in enumerate(self._column(STATE_AT // 4)):
            if state != FREE:
                with contextlib.suppress(SlotFreeError, TableLockTimeout):
                    out.append((slot, self.get(slot)))
        return out

    def close(self) -> None:
        """Unmap (idempotent). The file stays for other processes; unlink() removes it."""
        if self._mm is None:
            return
        with self._lock:  # closing any fd of the file drops all of this process's locks on it
            self._mm.close()
            os.close(self._fd)
            self._mm = None

    def unlink(self) -> None:
        """Remove the file (the creator's job); processes still attached keep their mapping."""
        self.path.unlink(missing_ok=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ---- slots ----------------------------------------------------------------------------------

    def _offset(self, slot: int) -> int:
        if self._mm is None:
            raise ValueError(f"request table {self.path} is closed")
        if not isinstance(slot, int) or not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot!r} is out of range for a table of {self.capacity} slots")
        return HEADER_BYTES + slot * self.slot_bytes

    def _read(self, off: int) -> _Slot:
        """The slot's fields as they are now (possibly torn unless the slot lock is held)."""
        state, id_crc, seq, length, crc = SLOT_HEADER.unpack_from(self._mm, off)
        start = off + SLOT_HEADER.size
        payload = self._mm[start:start + min(length, self._payload_cap)]  # never read past the slot
        return _Slot(state, id_crc, seq, length, crc, payload)

    def _read_stable(self, off: int) -> _Slot | None:
        """The fields if no writer touched the slot while they were read, else None."""
        seq = SEQ.unpack_from(self._mm, off + SEQ_AT)[0]
        if seq % 2:
            return None
        fields = self._read(off)
        return fields if SEQ.unpack_from(self._mm, off + SEQ_AT)[0] == seq else None

    def _intact(self, f: _Slot) -> bool:
        return f.state == FREE or (f.state == USED and f.length <= self._payload_cap
                                   and zlib.crc32(f.payload) == f.crc)

    def _decode(self, slot: int, f: _Slot) -> RequestRecord:
        """The slot's record; SlotFreeError if free, CorruptSlotError naming the slot if malformed."""
        if f.seq % 2:
            raise self._corrupt(slot, f"a writer died mid-write (seq {f.seq}); release the slot")
        if f.state == FREE:
            raise SlotFreeError(f"request table {self.path}, slot {slot} is free")
        if f.state != USED:
            raise self._corrupt(slot, f"state word {f.state:#x} is neither free (0) nor used (1)")
        if f.length > self._payload_cap:
            raise self._corrupt(slot, f"record length {f.length} exceeds the slot's "
                                      f"{self._payload_cap} bytes")
        if zlib.crc32(f.payload) != f.crc:
            raise self._corrupt(slot, "record checksum mismatch (memory scribbled over?)")
        try:
            return decode_record(f.payload)
        except msgspec.DecodeError as e:
            raise self._corrupt(slot, f"bytes with a valid checksum are not a request record: {e}") from e

    def _corrupt(self, slot: int, why: str) -> CorruptSlotError:
        return CorruptSlotError(f"request table {self.path}, slot {slot}: {why}")

    def _write(self, off: int, payload: bytes, owner: tuple[int, int] | None = None) -> None:
        """Seqlock write of the record (and of state and id_crc if `owner` is given); slot lock held.

        An odd seq left by a writer that died mid-copy stays odd until this write completes.
        """
        seq = SEQ.unpack_from(self._mm, off + SEQ_AT)[0] | 1
        self._put(off + SEQ_AT, SEQ.pack(seq))
        self._put(off + BODY_AT, BODY.pack(len(payload), zlib.crc32(payload)))
        self._put(off + SLOT_HEADER.size, payload)
        if owner is not None:
            self._put(off + STATE_AT, OWNER.pack(*owner))
        self._put(off + SEQ_AT, SEQ.pack(seq + 1))

    def _put(self, at: int, data: bytes) -> None:
        self._mm[at:at + len(data)] = data

    def _fitting(self, payload: bytes) -> bytes:
        if len(payload) > self._payload_cap:
            raise ValueError(f"the record encodes to {len(payload)} bytes; a {self.slot_bytes}-byte slot "
                             f"holds {self._payload_cap} ({SLOT_HEADER.size} go to the slot header): "
                             f"shorten its strings or create the table with a larger slot_bytes")
        return payload

    def _free_slots(self) -> list[int]:
        """Header lock held; TableFullError when there is none."""
        free = [slot for slot, state in enumerate(self._column(STATE_AT // 4)) if state == FREE]
        if not free:
            raise TableFullError(f"request table {self.path} is full: all {self.capacity} slots "
                                 f"are in use")
        return free

    def _column(self, word: int) -> list[int]:
        """The u32 at index `word` of every slot header, in slot order (one C-level strided copy)."""
        if self._mm is None:
            raise ValueError(f"request table {self.path} is closed")
        step = self.slot_bytes // 4
        with memoryview(self._mm) as raw, raw.cast("I") as words:
            return words[HEADER_BYTES // 4 + word::step].tolist()

    @contextlib.contextmanager
    def _locked(self, *ranges: tuple[int, int]) -> Iterator[None]:
        """Exclusive over every (start, length) byte range against other processes and this one's
        threads, all taken at once or none (never held while waiting); TableLockTimeout when they
        cannot all be had within LOCK_TIMEOUT_S."""
        busy = None

        def attempt() -> bool:
            nonlocal busy
            busy = self._try_all(ranges)
            return busy is None

        if not poll(attempt, LOCK_TIMEOUT_S, LOCK_PAUSE_S):
            raise self._timeout(*busy)
        try:
            yield
        finally:
            self._unlock(ranges)
            self._lock.release()

    def _try_all(self, ranges: tuple[tuple[int, int], ...]) -> tuple[int, int, str] | None:
        """This process's lock and every range, without waiting -> None; else what was busy (the
        range, and by whom), holding nothing."""
        if not self._lock.acquire(blocking=False):  # held by another thread only while it holds ranges
            return (*ranges[0], "by another thread of this process")
        taken: list[tuple[int, int]] = []
        for start, length in ranges:
            if not self._try_range(start, length):
                self._unlock(taken)
                self._lock.release()
                return start, length, "by another process (stopped or hung?)"
            taken.append((start, length))
        return None

    def _try_range(self, start: int, length: int) -> bool:
        """lockf without waiting (this process's lock held) -> whether it was had."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start, os.SEEK_SET)
            return True
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            return False

    def _unlock(self, ranges) -> None:
        for start, length in reversed(ranges):
            fcntl.lockf(self._fd, fcntl.LOCK_UN, length, start, os.SEEK_SET)

    def _timeout(self, start: int, length: int, held: str) -> TableLockTimeout:
        what = "slot allocation" if start == 0 else f"slot {(start - HEADER_BYTES) // self.slot_bytes}"
        return TableLockTimeout(f"request table {self.path}: {what} stayed locked {held} for "
                                f"{LOCK_TIMEOUT_S:g} s")

    def _check_header(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, HEADER.size, 0)
        short = len(raw) < HEADER.size
        magic, version, capacity, slot_bytes = (b"", 0, 0, 0) if short else HEADER.unpack(raw)
        if magic != MAGIC:
            raise TableFormatError(f"{self.path} is not a request table (magic {magic!r}, "
                                   f"expected {MAGIC!r})")
        if version != FORMAT_VERSION:
            raise TableFormatError(f"{self.path} has format version {version}; "
                                   f"this code reads {FORMAT_VERSION}")
        if (capacity, slot_bytes) != (self.capacity, self.slot_bytes):
            raise TableFormatError(f"{self.path} has capacity {capacity} and slot_bytes {slot_bytes}; "
                                   f"attached with capacity {self.capacity} and slot_bytes {self.slot_bytes}")
        if size != self._file_bytes:
            raise TableFormatError(f"{self.path} is {size} bytes; its header implies {self._file_bytes}")


# ---- helpers ----------------------------------------------------------------------------------

# lockf locks belong to the process, not the fd: threads (and several tables over one file)
# in a process would share them, so a per-file lock serialises this process's lock holders.
_process_locks: dict[tuple[int, int], threading.RLock] = {}
_process_locks_guard = threading.Lock()


def _process_lock(fd: int) -> threading.RLock:
    st = os.fstat(fd)
    with _process_locks_guard:
        return _process_locks.setdefault((st.st_dev, st.st_ino), threading.RLock())


def _id_crc(request_id: str) -> int:
    return zlib.crc32(request_id.encode()) or 1  # never 0, the id_crc of free slots


def _check_geometry(capacity: int, slot_bytes: int) -> None:
    if not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be an int in [1, {MAX_CAPACITY}], got {capacity!r}")
    if not isinstance(slot_bytes, int) or not 64 <= slot_bytes <= MAX_SLOT_BYTES or slot_bytes % 8:
        raise ValueError(f"slot_bytes must be a multiple of 8 in [64, {MAX_SLOT_BYTES}], got {slot_bytes!r}")


def default_root() -> Path:
    """/dev/shm/tokenpool-<uid>, or the same under the temp folder without /dev/shm."""
    return shm_root()

def _table_path(name: str, root: Path | None) -> Path:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"table name must be 1-64 characters of [A-Za-z0-9._-], not starting with "
                         f"'.' or '-'; got {name!r}")
    return private_dir(Path(root) if root is not None else default_root()) / f"{name}.reqtable"


def _create_file(path: Path, size: int, header: bytes) -> int:
    """A new file of `size` bytes starting with `header`, zeros after it; published with link()
    once complete, so no attacher ever sees it half-made. FileExistsError if `path` exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        _allocate(fd, size, path)
        os.pwrite(fd, header, 0)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"request table {path} already exists: attach with create=False, "
                                  f"or unlink it first") from None
    except BaseException:
        os.close(fd)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return fd


def _open_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise FileNotFoundError(f"no request table at {path}: create it first (create=True)") from None


def _allocate(fd: int, size: int, path: Path) -> None:
    """Back the file with memory now: a full /dev/shm fails here, not as SIGBUS on a later write."""
    os.ftruncate(fd, size)
    try:
        reserve(fd, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no room for a {size}-byte request table at {path}") from e
        raise
