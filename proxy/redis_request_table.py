"""RedisRequestTable: the RequestTable shared by proxies on several hosts, in one Redis server.

Keys (the {name} hash tag keeps a table's keys on one shard of a cluster):

    tokenpool:{name}:meta          hash   capacity, version (written once, by the first client)
    tokenpool:{name}:free          zset   free slot numbers (score = slot: the lowest goes first)
    tokenpool:{name}:used          zset   used slot numbers
    tokenpool:{name}:ids           hash   request_id -> slot
    tokenpool:{name}:slot:<n>      hash   rec (msgpack RequestRecord), rid, owner, ver
    tokenpool:{name}:alive:<owner> string a client's heartbeat, expiring after ttl_s

Every change is one Lua script, so capacity, the duplicate check and slot allocation are
atomic across clients. update() is compare-and-set on the slot's version (ver grows on every
write and never resets, so a slot released and reused is never mistaken for the old one): fn
runs here, and a write that lost a race is retried with the record that won.

Fencing: each client holds a heartbeat key it refreshes every ttl_s / HEARTBEATS_PER_TTL.
A client whose key lapsed (hung, partitioned, dead) is taken for dead: any client may then
reclaim its rows (table_recovery), and the lapsed client's own writes are refused
(TableFencedError) because the scripts check its key, so it can never write into a slot
that was reclaimed and handed to another request. A client that cannot reach Redis fences
itself: once ttl_s has passed since it sent the last renewal that succeeded, its key may
have lapsed (Redis set the expiry no earlier than that send), and the others may be
reclaiming its rows while its streams go on. A lapse is final for that client: its
proxy should be restarted. A live client's row is released only by that client.

Reporters (attach(): instances, `tokenpool status`) own no rows: no heartbeat, no insert or
release, and their updates are not fenced. They need no fence: a reporter's fn checks the
row's request id (touch_record) on the very version its compare-and-set replaces, so a
reclaimed row (released: the CAS finds the slot free) or a slot handed to another request
(another id) is never written, however late the write.
Records are msgspec msgpack (no pickle); a value that does not decode is a CorruptSlotError.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
from tokenpool.proxy.request_table import (
    CorruptSlotError,
    DuplicateRequestError,
    RequestRecord,
    RequestTable,
    SlotFreeError,
    TableFencedError,
    TableFullError,
    TableNotFoundError,
    TableUsage,
    decode_record,
    encode_record,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_CAPACITY = 1 << 20
MAX_RECORD_BYTES = 4096  # far above any record within RequestRecord's limits
DEFAULT_TTL_S = 10.0
SOCKET_TIMEOUT_S = 2.0  # a server gone quiet fails a call after this (the proxy calls from threads)
HEARTBEATS_PER_TTL = 5
FREE, CHANGED, FENCED, FULL, DUPLICATE, LIVE_OWNER = -1, -2, -3, -4, -5, -6

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_INIT = """
local p, cap = ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', p .. 'meta') == 1 then
  local m = redis.call('HMGET', p .. 'meta', 'capacity', 'version')
  return {tonumber(m[1]), tonumber(m[2])}
end
redis.call('HSET', p .. 'meta', 'capacity', cap, 'version', ARGV[3])
for i = 0, cap - 1 do redis.call('ZADD', p .. 'free', i, i) end
return {cap, tonumber(ARGV[3])}
"""

_INSERT = """
local p, rid, me = ARGV[1], ARGV[2], ARGV[4]
if redis.call('EXISTS', p .. 'alive:' .. me) == 0 then return -3 end
if redis.call('HEXISTS', p .. 'ids', rid) == 1 then return -5 end
local popped = redis.call('ZPOPMIN', p .. 'free')
if #popped == 0 then return -4 end
local slot = popped[1]
redis.call('ZADD', p .. 'used', tonumber(slot), slot)
redis.call('HSET', p .. 'slot:' .. slot, 'rec', ARGV[3], 'rid', rid, 'owner', me)
redis.call('HINCRBY', p .. 'slot:' .. slot, 'ver', 1)
redis.call('HSET', p .. 'ids', rid, slot)
return tonumber(slot)
"""

_CAS = """
local p, slot, me = ARGV[1], ARGV[2], ARGV[5]
if me ~= '' and redis.call('EXISTS', p .. 'alive:' .. me) == 0 then return -3 end
local cur = redis.call('HMGET', p .. 'slot:' .. slot, 'rid', 'ver')
if not cur[1] then return -1 end
if cur[2] ~= ARGV[3] then return -2 end
redis.call('HSET', p .. 'slot:' .. slot, 'rec', ARGV[4])
return redis.call('HINCRBY', p .. 'slot:' .. slot, 'ver', 1)
"""

_RELEASE = """
local p, slot, me = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', p .. 'alive:' .. me) == 0 then return -3 end
local key = p .. 'slot:' .. slot
local f = redis.call('HMGET', key, 'rid', 'owner')
if not f[1] then return -1 end
if f[2] and f[2] ~= me and redis.call('EXISTS', p .. 'alive:' .. f[2]) == 1 then return -6 end
if redis.call('HGET', p .. 'ids', f[1]) == slot then redis.call('HDEL', p .. 'ids', f[1]) end
redis.call('HDEL', key, 'rec', 'rid', 'owner')
redis.call('HINCRBY', key, 'ver', 1)
redis.call('ZREM', p .. 'used', slot)
redis.call('ZADD', p .. 'free', tonumber(slot), slot)
return 0
"""


class RedisRequestTable(RequestTable):
    """A RequestTable of `capacity` slots in Redis at `url`, shared by every client naming `name`.

    The first client creates the table; later ones must give the same capacity (ValueError
    otherwise). Each client is an owner with a heartbeat (ttl_s); close() ends it, after
    which the client's remaining rows, if any, are orphans for the others to reclaim.
    Calls are network round trips (remote): the proxy makes them off its event loop.
    attach() makes a reporter instead (see the module's docstring). Thread-safe; update()'s fn
    must not call the table.
    """

    remote = True

    def __init__(self, url: str | None, name: str, capacity: int, *, ttl_s: float = DEFAULT_TTL_S,
                 client: Any = None, owner: bool = True) -> None:
        _check_args(url, name, capacity, ttl_s, client)
        self.name, self.capacity, self.ttl_s = name, capacity, ttl_s
        self.prefix = key_prefix(name)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}" if owner else ""
        self._redis = client if client is not None else connect(url)
        self._scripts = {k: self._redis.register_script(s) for k, s in
                         (("init", _INIT), ("insert", _INSERT), ("cas", _CAS), ("release", _RELEASE))}
        self._fenced = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        if not owner:  # attach(): the table exists and capacity came from it
            return
        self._check_meta(self._scripts["init"](args=[self.prefix, capacity, FORMAT_VERSION]))
        self._created = time.monotonic()  # before the key is made: it expires no earlier than ttl_s on
        if not self._redis.set(self._alive_key(self.owner), "1", px=self._ttl_ms, nx=True):
            raise RuntimeError(f"owner id {self.owner!r} is already in use in table {name!r}")
        self._heartbeat = threading.Thread(target=self._beat, name=f"reqtable-heartbeat-{name}", daemon=True)
        self._heartbeat.start()

    @classmethod
    def attach(cls, url: str | None, name: str, *, client: Any = None) -> RedisRequestTable:
        """The existing table `name` as a reporter: capacity from the table, no heartbeat, updates
        only. TableNotFoundError while no proxy has made it; redis.ConnectionError if the server
        is unreachable."""
        _check_args(url, name, 1, DEFAULT_TTL_S, client)
        redis_client = client if client is not None else connect(url)
        try:
            capacity, version = redis_client.hmget(key_prefix(name) + "meta", "capacity", "version")
            if capacity is None:
                raise TableNotFoundError(f"no request table {name!r} in Redis at {url or 'the client'}: a "
                                         f"proxy with --table-backend redis --table {name} creates it")
            if int(version) != FORMAT_VERSION:
                raise ValueError(f"request table {name!r} in Redis has format version {int(version)}; "
                                 f"this code reads {FORMAT_VERSION}")
            return cls(url, name, int(capacity), client=redis_client, owner=False)
        except BaseException:
            if client is None:
                redis_client.close()
            raise

    @property
    def is_owner(self) -> bool:
        """False for a reporter (attach())."""
        return bool(self.owner)

    @property
    def fenced(self) -> bool:
        """Set by the heartbeat thread when it finds its key gone, or by a write the scripts refused."""
        return self._fenced

    # ---- RequestTable ---------------------------------------------------------------------------

    def insert(self, record: RequestRecord) -> int:
        self._owner_only("insert")
        payload = _fitting(encode_record(record))
        slot = self._scripts["insert"](args=[self.prefix, record.request_id, payload, self.owner])
        if slot == DUPLICATE:
            raise DuplicateRequestError(f"request {record.request_id!r} is already in table {self.name!r}")
        if slot == FULL:
            raise TableFullError(f"request table {self.name!r} is full: all {self.capacity} slots are in use")
        self._check(slot, "insert")
        return int(slot)

    def get(self, slot: int) -> RequestRecord:
        return self._decode(slot, self._redis.hget(self._slot_key(slot), "rec"))

    def find(self, request_id: str) -> int | None:
        slot = self._redis.hget(self.prefix + "ids", request_id)
        return None if slot is None else int(slot)

    def update(self, slot: int, fn: Callable[[RequestRecord], RequestRecord]) -> RequestRecord:
        key = self._slot_key(slot)
        while True:
            payload, version = self._redis.hmget(key, "rec", "ver")
            old = self._decode(slot, payload)
            new = fn(old)
            if new.request_id != old.request_id:
                raise ValueError(f"update of slot {slot} changed request_id {old.request_id!r} "
                                 f"to {new.request_id!r}; insert a new record instead")
            written = self._scripts["cas"](args=[self.prefix, slot, version, _fitting(encode_record(new)),
                                                 self.owner])
            if written == FREE:
                raise SlotFreeError(f"request table {self.name!r}, slot {slot} was released during update")
            if written != CHANGED:  # CHANGED: another writer won the race: run fn again on its record
                self._check(written, f"update of slot {slot}")
                return new

    def release(self, slot: int) -> None:
        self._owner_only("release")
        self._slot_key(slot)  # range check
        done = self._scripts["release"](args=[self.prefix, slot, self.owner])
        if done == FREE:
            raise SlotFreeError(f"request table {self.name!r}: slot {slot} is already free")
        if done == LIVE_OWNER:
            raise PermissionError(f"request table {self.name!r}: slot {slot} belongs to a live proxy; "
                                  f"only it may release the slot")
        self._check(done, f"release of slot {slot}")

    def usage(self) -> TableUsage:
        return TableUsage(self.capacity, self._redis.zcard(self.prefix + "used"))

    def records(self) -> list[tuple[int, RequestRecord]]:
        slots = [int(s) for s in self._redis.zrange(self.prefix + "used", 0, -1)]
        pipe = self._redis.pipeline(transaction=False)
        for slot in slots:
            pipe.hget(self._slot_key(slot), "rec")
        found = zip(slots, pipe.execute(), strict=True)
        return [(slot, self._decode(slot, payload)) for slot, payload in found
                if payload is not None]  # None: released since the slot list was read

    def owner_alive(self, slot: int, record: RequestRecord) -> bool | None:
        owner = self._redis.hget(self._slot_key(slot), "owner")
        return owner is not None and bool(self._redis.exists(self._alive_key(owner.decode())))

    def close(self) -> None:
        """End the heartbeat and drop this owner's key (idempotent); the table stays."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            if self._heartbeat is not None:
                self._heartbeat.join()
                self._redis.delete(self._alive_key(self.owner))
        finally:
            self._redis.close()

    def unlink(self) -> None:
        """Delete the whole table: every client's rows (an administrator's or a test's job)."""
        keys = list(self._redis.scan_iter(match=self.prefix.replace("{", "\\{").replace("}", "\\}") + "*"))
        if keys:
            self._redis.delete(*keys)

    # ---- slots and heartbeat --------------------------------------------------------------------

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def _alive_key(self, owner: str) -> str:
        return f"{self.prefix}alive:{owner}"

    def _slot_key(self, slot: int) -> str:
        if not isinstance(slot, int) or not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot!r} is out of range for a table of {self.capacity} slots")
        return f"{self.prefix}slot:{slot}"

    def _owner_only(self, what: str) -> None:
        if not self.is_owner:
            raise PermissionError(f"request table {self.name!r}: an attached reporter (an instance, "
                                  f"`tokenpool status`) may not {what} rows; only proxies own them")

    def _decode(self, slot: int, payload: bytes | None) -> RequestRecord:
        if payload is None:
            raise SlotFreeError(f"request table {self.name!r}, slot {slot} is free")
        try:
            return decode_record(payload)
        except msgspec.DecodeError as e:
            raise CorruptSlotError(f"request table {self.name!r}, slot {slot}: the stored bytes are not "
                                   f"a request record: {e}") from e

    def _check(self, code: int, what: str) -> None:
        if code == FENCED:
            self._fenced = True
            raise TableFencedError(f"{what} refused: this proxy's heartbeat in table {self.name!r} lapsed "
                                   f"(owner {self.owner!r}, ttl {self.ttl_s:g} s), so its rows may have "
                                   f"been reclaimed; the proxy stops, to be restarted: retry on another "
                                   f"proxy")

    def _check_meta(self, meta: list) -> None:
        capacity, version = (int(v) for v in meta)
        if version != FORMAT_VERSION:
            raise ValueError(f"request table {self.name!r} in Redis has format version {version}; "
                             f"this code reads {FORMAT_VERSION}")
        if capacity != self.capacity:
            raise ValueError(f"request table {self.name!r} in Redis has capacity {capacity}; attached with "
                             f"capacity {self.capacity} (every proxy needs the same --table-slots)")

    def _beat(self) -> None:
        """Refresh the heartbeat; XX: a key that already lapsed is never revived (fenced for good).
        Renewals that fail (Redis unreachable, or too slow for the socket timeout) fence this client
        once ttl_s has passed since the send of the last one that succeeded."""
        interval = self.ttl_s / HEARTBEATS_PER_TTL
        renewed = self._created
        while not self._stop.wait(max(0.0, min(interval, renewed + self.ttl_s - time.monotonic()))):
            sent = time.monotonic()
            if sent >= renewed + self.ttl_s:
                self._fenced = True
                log.error("request table %r: no heartbeat of %s got through for %.1f s (the ttl); it "
                          "may have lapsed, so this proxy is fenced", self.name, self.owner, sent - renewed)
                return
            try:
                if not self._redis.set(self._alive_key(self.owner), "1", px=self._ttl_ms, xx=True):
                    self._fenced = True
                    log.error("request table %r: heartbeat of %s lapsed; this proxy is fenced",
                              self.name, self.owner)
                    return
                renewed = sent
            except Exception as e:  # noqa: BLE001 -- a blip: the next beat may get through before the ttl
                log.warning("request table %r: heartbeat failed: %s", self.name, e)


def key_prefix(name: str) -> str:
    """Of every key of the table `name` (and what lives beside it); the {name} hash tag keeps them on
    one shard of a cluster."""
    return f"tokenpool:{{{name}}}:"


def connect(url: str):
    """A client of the Redis server at url, with the table's socket timeouts."""
    import redis  # the optional backend's import stays here

    return redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S)


def table_names(url: str) -> list[str]:
    """The names of the request tables in the Redis server at url (for `tokenpool status`)."""
    client = connect(url)
    try:
        names = {key.decode().split("{", 1)[1].rsplit("}", 1)[0]
                 for key in client.scan_iter(match="tokenpool:\\{*\\}:meta")}
    finally:
        client.close()
    return sorted(names)


def _fitting(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"the record encodes to {len(payload)} bytes; at most {MAX_RECORD_BYTES}")
    return payload


def _check_args(url, name, capacity, ttl_s, client) -> None:
    if client is None and not url:
        raise ValueError("the Redis request table needs a server: give --redis-url (e.g. redis://host:6379/0)")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"table name must be 1-64 characters of [A-Za-z0-9._-], not starting with "
                         f"'.' or '-'; got {name!r}")
    if not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be an int in [1, {MAX_CAPACITY}], got {capacity!r}")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive seconds, got {ttl_s!r}")
