"""KVTransferAgent: the node's KV hand-off control plane — it owns the host KV pool and hands out blocks.

    prefill instance                      agent (one per node)             decode instance
    Allocate(dims, dtype, n)  --------->  HandleBook.allocate -> offsets
    write the blocks (shared pool file)
    MarkReady(handle, num_tokens)  ---->  HandleBook.mark_ready
                 the handle travels prefill -> proxy -> decode  --------->  Describe once, map the file
                                                                            read the blocks
                                          HandleBook.renew    <----------  Renew(held handles),
                                                                            lease.py's heartbeat
                                          HandleBook.release  <----------  Release(handle)

Only offsets cross gRPC; KV bytes move through the shared file. A ready handle is leased to its
receiver: when nobody renews it within the lease (the decode instance died, or the request never
reached one), a periodic sweep frees its blocks. A handle nobody marks ready or releases within its
ttl (its prefill instance crashed) is reclaimed by the same sweep, so the pool cannot leak forever.
With a NIXL data plane (nixl=True) the agent also moves KV to other nodes' agents: Allocate with a
destination, Push, and MarkReady answering the destination's handle (cross_node.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import grpc
from tokenpool.engine.host_kv_pool import DEFAULT_SLAB_BYTES, HostKVPool
from tokenpool.engine.slab_allocator import BlockShape, KVPoolFullError
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.telemetry import tracing

from .cross_node import DEFAULT_MAX_PEERS, DEFAULT_STALL_S, CrossNode, CrossNodeError
from .handle import KVHandleInfo, handle_to_pb, shape_from_pb
from .lease import DEFAULT_LEASE_S, MIN_LEASE_S, RENEW_INTERVAL_S

logger = logging.getLogger(__name__)

SERVICE_NAME = ipb.DESCRIPTOR.services_by_name["KVTransfer"].full_name  # tokenpool.internal.v1.KVTransfer
DEFAULT_HANDLE_TTL_S = 300.0
MAX_SWEEP_INTERVAL_S = 10.0
MAX_RENEW_IDS = 4096


class UnknownHandleError(LookupError):
    """No live handle has this id: never allocated, already released, or reclaimed after its ttl."""


@dataclass
class _Entry:
    info: KVHandleInfo
    request_id: str
    deadline: float  # clock() after which the sweep reclaims the blocks
    ready: bool = False
    stall_s: float | None = None  # cross-node: reclaimed when not ready and untouched this long
    stall_deadline: float = float("inf")
    lease_deadline: float = float("inf")  # once ready: reclaimed when not renewed by then


@dataclass(frozen=True)
class BookStats:
    handles: int  # allocated and not yet released
    blocks: int  # blocks those handles hold


class HandleBook:
    """The agent's handles over a HostKVPool: allocate, mark ready, renew, release, reclaim.

    A handle's ttl runs from its allocation; marking it ready does not extend it. Marking it
    ready also starts its lease: renew() (the receiver's heartbeat) extends it to lease_s from
    now, and a ready handle not renewed in time is reclaimed. A handle allocated with stall_s (a
    cross-node transfer) is also reclaimed when it is not ready and nothing touch()ed it for
    stall_s. Not thread-safe: the agent calls it from its event loop only.
    """

    def __init__(self, pool: HostKVPool, ttl_s: float = DEFAULT_HANDLE_TTL_S,
                 clock: Callable[[], float] = time.monotonic, lease_s: float = DEFAULT_LEASE_S) -> None:
        if not ttl_s > 0:
            raise ValueError(f"handle ttl must be positive seconds, got {ttl_s!r}")
        if not lease_s >= MIN_LEASE_S:
            raise ValueError(f"lease must be at least {MIN_LEASE_S:g} s (receivers renew every "
                             f"{RENEW_INTERVAL_S:g} s), got {lease_s!r}")
        self.pool = pool
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self.agent_address = ""  # the owning agent's control address, stamped on handles once known

    def allocate(self, shape: BlockShape, num_blocks: int, request_id: str = "",
                 stall_s: float | None = None) -> KVHandleInfo:
        """A new handle (num_tokens 0, not ready) of num_blocks pool blocks of `shape`.

        ValueError for num_blocks < 1 or a block larger than a slab; KVPoolFullError, nothing
        allocated, when the blocks do not fit.
        """
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        offsets = self.pool.alloc(shape, num_blocks)
        info = KVHandleInfo(secrets.token_hex(16), tuple(offsets), shape, 0, self.agent_address)
        entry = _Entry(info, request_id, self._clock() + self.ttl_s, stall_s=stall_s)
        self._entries[info.handle_id] = entry
        self.touch(info.handle_id)
        return info

    def touch(self, handle_id: str) -> None:
        """Progress on a handle allocated with stall_s: its stall timer starts over."""
        entry = self._entry(handle_id)
        if entry.stall_s is not None:
            entry.stall_deadline = self._clock() + entry.stall_s

    def is_live(self, handle_id: str) -> bool:
        return handle_id in self._entries

    def info(self, handle_id: str) -> KVHandleInfo:
        return self._entry(handle_id).info

    def mark_ready(self, handle_id: str, num_tokens: int) -> KVHandleInfo:
        """Record that the handle's blocks hold num_tokens tokens of KV; ValueError if they cannot."""
        entry = self._entry(handle_id)
        info = entry.info
        if num_tokens > info.capacity_tokens:
            raise ValueError(f"num_tokens={num_tokens} exceeds what handle {handle_id}'s {info.num_blocks} "
                             f"blocks of {info.shape.block_size} tokens hold ({info.capacity_tokens})")
        entry.info = replace(info, num_tokens=num_tokens)
        entry.ready = True
        entry.lease_deadline = self._clock() + self.lease_s
        return entry.info

    def renew(self, handle_ids: Sequence[str]) -> list[str]:
        """The receiver's heartbeat: each live ready handle is held lease_s from now -> the ids
        that are not live (the receiver must not read them). A handle not yet ready is left as
        it is (its sender still writes it; the ttl covers it)."""
        now, unknown = self._clock(), []
        for handle_id in handle_ids:
            entry = self._entries.get(handle_id)
            if entry is None:
                unknown.append(handle_id)
            elif entry.ready:
                entry.lease_deadline = now + self.lease_s
        return unknown

    def release(self, handle_id: str) -> int:
        """Free the handle's blocks -> how many; UnknownHandleError for an id not live."""
        entry = self._entry(handle_id)
        del self._entries[handle_id]
        self.pool.free(entry.info.offsets)
        return entry.info.num_blocks

    def release_request(self, request_id: str) -> int:
        """Free every handle allocated for request_id -> blocks freed (0 when there are none)."""
        if not request_id:
            raise ValueError("request_id is empty")
        ids = [h for h, e in self._entries.items() if e.request_id == request_id]
        return sum(self.release(h) for h in ids)

    def reclaim_expired(self) -> list[str]:
        """Release every handle past its ttl or lease (a warning each, naming its request) -> their ids."""
        now = self._clock()
        expired = [e for e in self._entries.values() if e.deadline <= now or e.lease_deadline <= now
                   or (not e.ready and e.stall_deadline <= now)]
        for entry in expired:
            self.release(entry.info.handle_id)
            if entry.lease_deadline <= now:
                logger.warning("reclaimed KV handle %s of request %r: its lease ran out (not renewed for "
                               "%.1f s: the receiver is gone; %d blocks)", entry.info.handle_id,
                               entry.request_id, self.lease_s, entry.info.num_blocks)
            elif entry.deadline <= now:
                logger.warning("reclaimed KV handle %s of request %r: not released within %.0f s (%d blocks, "
                               "%s)", entry.info.handle_id, entry.request_id, self.ttl_s,
                               entry.info.num_blocks,
                               "ready" if entry.ready else "never marked ready")
            else:
                logger.warning("reclaimed KV handle %s of request %r: its cross-node transfer stalled (no "
                               "progress for %.1f s, %d blocks)", entry.info.handle_id, entry.request_id,
                               entry.stall_s, entry.info.num_blocks)
        return [e.info.handle_id for e in expired]

    def stats(self) -> BookStats:
        return BookStats(len(self._entries), sum(e.info.num_blocks for e in self._entries.values()))

    def _entry(self, handle_id: str) -> _Entry:
        entry = self._entries.get(handle_id)
        if entry is None:
            raise UnknownHandleError(f"no KV handle {handle_id!r} on this node (released, reclaimed "
                                     f"after {self.ttl_s:.0f} s, or never allocated)")
        return entry


# Checked in order: KVPoolFullError is a MemoryError, the rest are the book's and handle.py's.
_STATUS = ((KVPoolFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
           (UnknownHandleError, grpc.StatusCode.NOT_FOUND),
           (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
           (PermissionError, grpc.StatusCode.PERMISSION_DENIED))
_REFUSALS = (KVPoolFullError, UnknownHandleError, ValueError, PermissionError, CrossNodeError)


class KVTransferAgent(instances_pb2_grpc.KVTransferServicer):
    """The KVTransfer service over a HostKVPool it owns: protobuf in, HandleBook, protobuf out.

    Call start() in the serving event loop (starts the ttl sweep) and close() when done (stops
    it and unlinks the pool file). RuntimeError at construction when the pool could not be put
    in a shared-memory file, since other processes could not map an anonymous one.
    """

    def __init__(self, pool_bytes: int, slab_bytes: int = DEFAULT_SLAB_BYTES,
                 handle_ttl_s: float = DEFAULT_HANDLE_TTL_S, lease_s: float = DEFAULT_LEASE_S,
                 sweep_interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, metrics=None, name: str = "kvtransfer-0",
                 nixl: bool = False, allowed_peers: frozenset[str] | None = None,
                 max_peers: int = DEFAULT_MAX_PEERS, stall_s: float = DEFAULT_STALL_S,
                 transfer_timeout_s: float | None = None) -> None:
        """metrics: a telemetry.agent_metrics.AgentMetrics to count hand-offs in, or None.
        nixl: register the pool with a NIXL agent named `name` and serve cross-node transfers, with
        at most max_peers peers (only allowed_peers, if given); cross-node handles that make no
        progress for stall_s are reclaimed; one push may take transfer_timeout_s (< stall_s)."""
        if sweep_interval_s is not None and not sweep_interval_s > 0:
            raise ValueError(f"sweep_interval_s must be positive seconds, got {sweep_interval_s!r}")
        self.pool = _shared_pool(pool_bytes, slab_bytes)
        try:
            self.book = HandleBook(self.pool, handle_ttl_s, clock, lease_s)
            self.cross = _cross_node(self.book, self.pool, name, allowed_peers, max_peers, stall_s,
                                     transfer_timeout_s) if nixl else None
        except BaseException:
            self.pool.close()  # a bad ttl must not leave a pool file behind
            raise
        interval = min(handle_ttl_s / 4, lease_s / 4, MAX_SWEEP_INTERVAL_S,
                       stall_s / 4 if nixl else MAX_SWEEP_INTERVAL_S)
        self.sweep_interval_s = sweep_interval_s or interval
        self._sweeper: asyncio.Task | None = None
        self.metrics = metrics
        self.name = name

    @property
    def address(self) -> str:
        return self.book.agent_address

    @address.setter
    def address(self, value: str) -> None:
        """Where this agent serves (known once it does): stamped on its handles, told to peers."""
        self.book.agent_address = value
        if self.cross is not None:
            self.cross.address = value

    def start(self) -> None:
        """Start the ttl sweep on the running event loop."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if self.cross is not None:
            self.cross.start()
        if self.metrics is not None:
            self.metrics.bind(asyncio.get_running_loop(), self._gauges)

    def _gauges(self) -> dict[str, float]:
        book = self.book.stats()
        return {"tokenpool_handoff_pool_used_bytes": self.pool.stats().used_bytes,
                "tokenpool_handoff_pool_capacity_bytes": self.pool.nbytes,
                "tokenpool_handoff_live_handles": book.handles, "tokenpool_handoff_live_blocks": book.blocks}

    def close(self) -> None:
        """Stop the sweep and close the pool (its file is unlinked; peers' mappings stay valid)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.cross is not None:
            self.cross.close()
        self.pool.close()

    async def Allocate(self, request, context):
        async def allocate() -> ipb.KVHandle:
            try:
                shape = shape_from_pb(request.block_dims, request.dtype)
                handle = await self._allocate(shape, request)
            except (KVPoolFullError, ValueError) as exc:
                if self.metrics is not None:
                    self.metrics.refused.labels("pool_full" if isinstance(exc, KVPoolFullError)
                                                else "invalid").inc()
                raise
            nbytes = handle.num_blocks * shape.nbytes
            tracing.annotate(request_id=request.request_id, kv_blocks=handle.num_blocks, kv_bytes=nbytes,
                             kv_path="nixl" if request.destination or request.source else "node-local",
                             pool=str(self.pool.path))
            if self.metrics is not None:
                self.metrics.handles.inc()
                self.metrics.bytes.inc(nbytes)
            return handle_to_pb(handle, ready=False)
        return await _answer_async(context, allocate)

    async def _allocate(self, shape, request) -> KVHandleInfo:
        if not (request.destination or request.source):
            return self.book.allocate(shape, request.num_blocks, request.request_id)
        if self.cross is None:
            raise CrossNodeError(f"{self.name} has no NIXL data plane (start it with --nixl); it cannot move "
                                 f"KV across nodes", grpc.StatusCode.FAILED_PRECONDITION)
        if request.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {request.num_blocks}")
        if request.source:
            return self.cross.allocate_in(shape, request.num_blocks, request.request_id, request.source)
        return await self.cross.allocate_out(shape, request.num_blocks, request.request_id,
                                             request.destination)

    async def MarkReady(self, request, context):
        tracing.annotate(kv_tokens=request.num_tokens)
        if self.cross is not None and self.cross.is_routed(request.handle_id):
            return await _answer_async(context, lambda: self.cross.complete(request.handle_id,
                                                                            request.num_tokens))
        return await _answer(context, lambda: handle_to_pb(
            self.book.mark_ready(request.handle_id, request.num_tokens), ready=True))

    async def Release(self, request, context):
        def release() -> ipb.ReleaseResponse:
            if self.cross is not None and self.cross.is_routed(request.handle_id):
                blocks = self.cross.release(request.handle_id)
            else:
                blocks = self.book.release(request.handle_id)
            tracing.annotate(kv_blocks=blocks)
            if self.metrics is not None:
                self.metrics.releases.inc()
            return ipb.ReleaseResponse(num_blocks=blocks)
        return await _answer(context, release)

    async def Renew(self, request, context):
        def renew() -> ipb.RenewResponse:
            if len(request.handle_ids) > MAX_RENEW_IDS:
                raise ValueError(f"renew at most {MAX_RENEW_IDS} handles a call, "
                                 f"got {len(request.handle_ids)}")
            return ipb.RenewResponse(unknown_handle_ids=self.book.renew(request.handle_ids),
                                     lease_s=self.book.lease_s)
        return await _answer(context, renew)

    async def ReleaseAll(self, request, context):
        def release_all() -> ipb.ReleaseResponse:
            blocks = self.book.release_request(request.request_id)
            if self.cross is not None:
                self.cross.drop_dead_routes()
            tracing.annotate(kv_blocks=blocks)
            return ipb.ReleaseResponse(num_blocks=blocks)
        return await _answer(context, release_all)

    async def Connect(self, request, context):
        if self.cross is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{self.name} has no NIXL data plane (start it with --nixl)")
        return await _answer(context, lambda: self.cross.register(request))

    async def Push(self, request, context):
        if self.cross is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{self.name} has no NIXL data plane (start it with --nixl)")
        reply = await _answer_async(context, lambda: self.cross.push(request))
        tracing.annotate(kv_bytes=reply.bytes, kv_push_s=reply.seconds)
        return reply

    async def Describe(self, request, context):
        return ipb.PoolInfo(path=str(self.pool.path), nbytes=self.pool.nbytes,
                            slab_bytes=self.pool.allocator.slab_bytes, address=self.address)

    async def Stats(self, request, context):
        book = self.book.stats()
        return ipb.PoolStats(capacity_bytes=self.pool.nbytes, used_bytes=self.pool.stats().used_bytes,
                             handles=book.handles, blocks=book.blocks)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                reclaimed = self.book.reclaim_expired()
                if self.cross is not None:
                    self.cross.drop_dead_routes()
                if reclaimed and self.metrics is not None:
                    self.metrics.reclaimed.inc(len(reclaimed))
            except Exception:  # a sweep that died would leak every later crashed handle
                logger.exception("KV handle sweep failed; retrying in %.1f s", self.sweep_interval_s)


def _shared_pool(pool_bytes: int, slab_bytes: int) -> HostKVPool:
    pool = HostKVPool(pool_bytes, slab_bytes=slab_bytes)
    if pool.path is None:
        pool.close()
        raise RuntimeError("the host KV pool fell back to an anonymous mapping (see the warning above), "
                           "which other processes cannot map; the KV transfer agent needs a writable "
                           "/dev/shm with room for the pool")
    return pool


def _cross_node(book: HandleBook, pool: HostKVPool, name: str, allowed_peers, max_peers: int,
                stall_s: float, transfer_timeout_s: float | None) -> CrossNode:
    from .nixl_link import NixlLink

    options = {} if transfer_timeout_s is None else {"transfer_timeout_s": transfer_timeout_s}
    return CrossNode(book, NixlLink(name, pool.buffer), allowed_peers, max_peers, stall_s, **options)


async def _answer(context, work: Callable[[], object]):
    """work()'s message, or the call aborted with the status its exception maps to."""
    try:
        return work()
    except _REFUSALS as exc:
        await context.abort(_code(exc), str(exc))


async def _answer_async(context, work: Callable[[], Awaitable]):
    """As _answer, for work() returning an awaitable."""
    try:
        return await work()
    except _REFUSALS as exc:
        await context.abort(_code(exc), str(exc))


def _code(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, CrossNodeError):
        return exc.code
    return next(code for kind, code in _STATUS if isinstance(exc, kind))

