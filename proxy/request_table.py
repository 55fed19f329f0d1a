"""RequestTable: the node's table of in-flight requests, one record per slot.

Every proxy worker and instance on a node reads and updates the same table; beyond one
machine the same interface is backed by Redis. Records are msgspec Structs with explicit
fields, so every backend stores the same bytes and validates the same limits.
"""

from __future__ import annotations

import enum
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Annotated, Any

import msgspec

MAX_REQUEST_ID_CHARS = 64
MAX_MODEL_CHARS = 128
MAX_INSTANCE_CHARS = 48
MAX_ERROR_CHARS = 128  # with the limits above: any ASCII record fits a 512-byte slot

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class RequestState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


class RequestRecord(msgspec.Struct, frozen=True, array_like=True):
    """One request's row. Change it with msgspec.structs.replace inside RequestTable.update.

    array_like: encoded positionally (compact); field order is part of the table format.
    """

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST_ID_CHARS)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MODEL_CHARS)]
    state: RequestState = RequestState.QUEUED
    prefill_instance: Annotated[str, msgspec.Meta(max_length=MAX_INSTANCE_CHARS)] = ""
    decode_instance: Annotated[str, msgspec.Meta(max_length=MAX_INSTANCE_CHARS)] = ""
    num_prompt_tokens: TokenCount = 0
    num_output_tokens: TokenCount = 0
    created_ns: NonNegative = 0
    updated_ns: NonNegative = 0
    deadline_ns: NonNegative = 0  # 0: no deadline
    error: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_CHARS)] = ""
    proxy_pid: NonNegative = 0  # the proxy that admitted it (0: unknown); a dead proxy's rows are orphans


class TableUsage(msgspec.Struct, frozen=True):
    capacity: int
    used: int

    @property
    def free(self) -> int:
        return self.capacity - self.used


class TableFullError(RuntimeError):
    """No free slot: the caller should shed load (e.g. RESOURCE_EXHAUSTED); insert never waits."""


class DuplicateRequestError(ValueError):
    """A record with this request_id is already in the table."""


class SlotFreeError(LookupError):
    """The slot holds no record (never inserted, or released)."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


class TableLockTimeout(TimeoutError):
    """A row (or the table's slot allocation) stayed locked by a process that does not let go of
    it (stopped, or hung) for longer than a live writer ever holds it; nothing was changed. Retry
    later: the lock frees when that process runs again or dies."""


class TableFencedError(RuntimeError):
    """This client was taken for dead by a shared table (its heartbeat lapsed): its rows may have
    been reclaimed, so it may not write any more. Its proxy should stop admitting and be restarted."""


class TableNotFoundError(FileNotFoundError):
    """No table of that name yet: its proxy creates it (instances start first and attach later)."""


class CorruptSlotError(RuntimeError):
    """A slot's bytes are not a valid record (scribbled memory, or a writer died mid-write).

    release(slot) clears it.
    """


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RequestRecord)


def encode_record(record: RequestRecord) -> bytes:
    """The record's msgpack bytes; ValueError naming the field if it breaks a limit."""
    if not isinstance(record, RequestRecord):
        raise TypeError(f"expected a RequestRecord, got {type(record).__name__}")
    try:
        payload = _encoder.encode(record)
        _decoder.decode(payload)  # Struct construction does not check Meta limits; a round trip does
    except (msgspec.ValidationError, OverflowError) as e:
        raise ValueError(f"invalid request record {record.request_id!r}: {_name_fields(str(e))}") from e
    return payload


def _name_fields(message: str) -> str:
    """array_like errors say `$[7]`; say `created_ns` instead."""
    return re.sub(r"`\$\[(\d+)\]`", lambda m: RequestRecord.__struct_fields__[int(m[1])], message)


def decode_record(payload: bytes) -> RequestRecord:
    """Raises msgspec.DecodeError (a ValueError) on bytes that are not a valid record."""
    return _decoder.decode(payload)


class RequestTable(ABC):
    """Fixed-capacity table of RequestRecords addressed by slot number; safe across processes."""

    # Calls go over the network and may take up to a socket timeout when the server is slow:
    # an event loop makes them from a thread (the proxy's admissions and row ends).
    remote = False

    @abstractmethod
    def insert(self, record: RequestRecord) -> int:
        """Store a new record and return its slot.

        TableFullError at once when no slot is free; DuplicateRequestError if the id is present;
        ValueError if the record breaks a limit. Nothing is written on error.
        """

    @abstractmethod
    def get(self, slot: int) -> RequestRecord:
        """The slot's record, never a torn one. SlotFreeError, CorruptSlotError, IndexError."""

    @abstractmethod
    def find(self, request_id: str) -> int | None:
        """The slot holding request_id, or None."""

    @abstractmethod
    def update(self, slot: int, fn: Callable[[RequestRecord], RequestRecord]) -> RequestRecord:
        """Atomically replace the slot's record with fn(record) and return it.

        No other update of the slot interleaves. fn must keep request_id. If fn raises or the
        new record breaks a limit, the old record stays.
        """

    @abstractmethod
    def release(self, slot: int) -> None:
        """Free the slot (also clears a corrupt one). SlotFreeError if it is already free."""

    @abstractmethod
    def usage(self) -> TableUsage: ...

    @abstractmethod
    def records(self) -> list[tuple[int, RequestRecord]]:
        """Every used slot with its record, in slot order (a snapshot slot by slot, not global)."""

    @abstractmethod
    def close(self) -> None:
        """Let go of the table (idempotent; the data stays for other processes)."""

    @property
    def fenced(self) -> bool:
        """True once a shared table has taken this client for dead (its heartbeat lapsed): from then
        on its writes are refused (TableFencedError) for good, so its proxy stops and is restarted.
        Cheap (a flag, no round trip): a proxy polls it. Always False without heartbeats (shm)."""
        return False

    def owner_alive(self, slot: int, record: RequestRecord) -> bool | None:
        """Whether the proxy that admitted the slot's record still runs, for a backend that tracks
        owners itself (Redis: a heartbeat key per proxy); None: judge by record.proxy_pid on this host."""
        return None

    def __enter__(self) -> RequestTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_request_table(kind: str, *, attach: bool = False, **options: Any) -> RequestTable:
    """A table backend by name: "shm" (one node; options: ShmRequestTable's) or "redis" (proxies on
    several hosts; options: RedisRequestTable's).

    attach=True takes an existing table as it is, its geometry from the table itself (options: name,
    and url for redis), for the processes that report into a proxy's table rather than own it
    (instances, `tokenpool status`); TableNotFoundError (a FileNotFoundError) until it exists."""
    if kind == "shm":
        from tokenpool.proxy.shm_request_table import ShmRequestTable

        return ShmRequestTable.attach(**options) if attach else ShmRequestTable(**options)
    if kind == "redis":
        from tokenpool.proxy.redis_request_table import RedisRequestTable

        return RedisRequestTable.attach(**options) if attach else RedisRequestTable(**options)
    raise ValueError(f"unknown request table kind {kind!r}; expected 'shm' or 'redis'")


ATTEMPT_MARK = "~"  # a re-dispatched request runs on the instances as '<request_id>~<attempt>'


TERMINAL_STATES = frozenset({RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED})
_PROGRESS_ORDER = (RequestState.QUEUED, RequestState.PREFILLING, RequestState.TRANSFERRING,
                   RequestState.DECODING)


class _NotOurs(Exception):
    """Raised inside touch_record's update fn: leave the row exactly as it is (no write at all)."""


def touch_record(table: RequestTable | None, slot: int | None, request_id: str, **changes: Any) -> bool:
    """Update a request's row from an instance: only if the slot still holds request_id, or the
    request of which request_id is a re-dispatch ('<id>~<n>', see FleetBackend); a released slot
    may hold another request by now. False when the row is gone, never raises for that;
    instances report progress best-effort and must not fail a request over it.

    An instance never owns a row, so its write never changes the row's life: a released row stays
    released (update refuses a free slot, on every backend), a row the proxy ended (a terminal
    state, set just before release) is left alone, and a late report of an earlier stage (a
    delayed 'transferring' after the proxy saw tokens) does not move the state back; a re-dispatch
    ('<id>~<n>') starts over from prefill, so its state is taken as it comes."""
    if table is None or slot is None:
        return False

    def ours(record: RequestRecord) -> bool:
        return request_id == record.request_id or request_id.startswith(record.request_id + ATTEMPT_MARK)

    def change(record: RequestRecord) -> RequestRecord:
        if not ours(record) or record.state in TERMINAL_STATES:
            raise _NotOurs
        fields = dict(changes)
        if request_id == record.request_id and _moves_back(record.state, fields.get("state")):
            del fields["state"]
        return msgspec.structs.replace(record, updated_ns=time.time_ns(), **fields)

    try:
        table.update(slot, change)
        return True
    except (_NotOurs, SlotFreeError, CorruptSlotError, IndexError):
        return False


def _moves_back(current: RequestState, new: RequestState | None) -> bool:
    if new is None or new in TERMINAL_STATES or current not in _PROGRESS_ORDER:
        return False
    return _PROGRESS_ORDER.index(new) < _PROGRESS_ORDER.index(current)
