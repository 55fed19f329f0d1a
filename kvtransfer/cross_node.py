"""CrossNode: the kvtransfer agent's part in moving KV to another node's pool over NIXL.

    prefill instance         agent A (prefill node)                      agent B (decode node)
    Allocate(dest=B) ---->   local blocks;  B.Connect once (metadata) -> registers A (bounded)
                             B.Allocate(source=A) ------------------->   inbound blocks (stall timer)
    write layers into A's pool (shared file), then for each group of layers:
    Push(layers, blocks) ->  NIXL WRITE A's blocks -> B's blocks ======>  notif: progress (timer reset)
    MarkReady(n) -------->   B.MarkReady(n) ------------------------->   ready: B's handle
                <---------   release A's blocks, answer B's handle (agent = B)
    the handle goes prefill -> proxy -> decode instance on B, which reads B's pool as on one node

A's agent drives (WRITE): it learns of each finished layer from the Push, so the transfer of
layer i overlaps the prefill's compute of layer i+1. Failure frees blocks on both sides: a push
that errs or times out (peer gone, stalled) releases A's blocks and B's (best effort); a sender
that goes silent (its instance or agent killed) leaves unready blocks that each side's sweep
reclaims once no push or notification refreshed them for stall_s.

Transfers are accepted only from registered peers: B refuses an inbound Allocate from an agent
that has not Connected, and a peer learns B's pool (its NIXL metadata) only by Connecting.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field

import grpc
from tokenpool.engine.slab_allocator import BlockShape, KVPoolFullError
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.telemetry.grpc_tracing import aio_channel

from .handle import KVHandleInfo, handle_from_pb, shape_to_dims
from .nixl_link import NixlLink, PeerRegion, TransferFailedError, TransferTimeoutError, merge_spans

log = logging.getLogger(__name__)

DEFAULT_MAX_PEERS = 16
DEFAULT_STALL_S = 30.0  # an unready cross-node handle with no progress for this long is reclaimed
DEFAULT_TRANSFER_TIMEOUT_S = 10.0  # one Push's NIXL WRITE; kept below the stall timeout
CALL_TIMEOUT_S = 10.0
NOTIF_POLL_S = 0.05
MAX_METADATA_BYTES = 1 << 20
PROGRESS = b"kv-progress:"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CrossNodeError(RuntimeError):
    """A cross-node step failed; code: the gRPC status to answer with."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Peer:
    region: PeerRegion
    address: str
    channel: grpc.aio.Channel
    stub: instances_pb2_grpc.KVTransferStub


@dataclass
class _Route:
    """Where an outbound handle's blocks go: the peer and the handle it reserved there."""

    peer: str
    remote: KVHandleInfo
    pushes: int = 0  # in flight: the remote blocks may not be released under a WRITE
    dropped: bool = False
    waiters: list[asyncio.Future] = field(default_factory=list)


class CrossNode:
    """Peers, outbound routes, pushes and inbound progress of one agent (its event loop only)."""

    def __init__(self, book, link: NixlLink, allowed_peers: frozenset[str] | None = None,
                 max_peers: int = DEFAULT_MAX_PEERS, stall_s: float = DEFAULT_STALL_S,
                 transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S) -> None:
        if max_peers < 1:
            raise ValueError(f"max_peers must be >= 1, got {max_peers}")
        if not 0 < transfer_timeout_s < stall_s:
            raise ValueError(f"need 0 < transfer_timeout_s < stall_s, got {transfer_timeout_s!r} and "
                             f"{stall_s!r} (a stalled handle must not be reclaimed under a live WRITE)")
        self.book = book
        self.link = link
        self.allowed_peers = allowed_peers
        self.max_peers = max_peers
        self.stall_s = stall_s
        self.transfer_timeout_s = transfer_timeout_s
        self.address = ""  # this agent's control address, set once it serves
        self._peers: dict[str, _Peer] = {}
        self._by_address: dict[str, str] = {}
        self._connecting = asyncio.Lock()
        self._routes: dict[str, _Route] = {}  # outbound: local handle id -> route
        self._inbound: dict[str, str] = {}  # inbound: local handle id -> the peer filling it
        self._poller: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def name(self) -> str:
        return self.link.name

    def info(self) -> ipb.AgentInfo:
        return ipb.AgentInfo(name=self.name, nixl_metadata=self.link.metadata(),
                             pool_address=self.link.address, pool_nbytes=self.link.nbytes,
                             address=self.address)

    def start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_notifs())

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self.link.close()

    def is_routed(self, handle_id: str) -> bool:
        return handle_id in self._routes

    # -- registration -------------------------------------------------------------------------------

    def register(self, info: ipb.AgentInfo) -> ipb.AgentInfo:
        """A peer's Connect: check and register it -> this agent's info."""
        self._add_peer(info)
        return self.info()

    async def _peer_at(self, address: str) -> _Peer:
        """The registered peer serving at address, Connecting to it first if needed."""
        async with self._connecting:
            name = self._by_address.get(address)
            if name in self._peers:
                return self._peers[name]
            channel = aio_channel(address)
            stub = instances_pb2_grpc.KVTransferStub(channel)
            try:
                reply = await stub.Connect(self.info(), timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                await channel.close()
                raise CrossNodeError(f"connecting to the agent at {address} failed: {exc.code().name}: "
                                     f"{exc.details()}", _unreachable(exc.code())) from None
            if reply.address != address:
                reply.address = address  # the address we reached it at is the one routes use
            return self._add_peer(reply, channel, stub)

    def _add_peer(self, info: ipb.AgentInfo, channel=None, stub=None) -> _Peer:
        _check_info(info)
        if info.name == self.name:
            raise ValueError(f"peer name {info.name!r} is this agent's own")
        if self.allowed_peers is not None and info.name not in self.allowed_peers:
            raise PermissionError(f"agent {info.name!r} is not an allowed peer of {self.name} "
                                  f"(allowed: {', '.join(sorted(self.allowed_peers))})")
        if info.name not in self._peers and len(self._peers) >= self.max_peers:
            raise CrossNodeError(f"{self.name} already has {len(self._peers)} peers, the limit",
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
        if info.name in self._peers:  # a restarted peer: new metadata, new pool
            self.link.remove_peer(info.name)
        region = PeerRegion(info.name, info.pool_address, info.pool_nbytes)
        self.link.add_peer(region, info.nixl_metadata)
        if channel is None:
            channel = aio_channel(info.address)
            stub = instances_pb2_grpc.KVTransferStub(channel)
        peer = _Peer(region, info.address, channel, stub)
        self._peers[info.name] = peer
        self._by_address[info.address] = info.name
        log.info("%s: registered peer %s at %s (pool of %d bytes)", self.name, info.name, info.address,
                 info.pool_nbytes)
        return peer

    # -- outbound -----------------------------------------------------------------------------------

    async def allocate_out(self, shape: BlockShape, num_blocks: int, request_id: str,
                           destination: str) -> KVHandleInfo:
        """Blocks here and on the agent at destination, routed together -> the local handle."""
        peer = await self._peer_at(destination)
        local = self.book.allocate(shape, num_blocks, request_id, stall_s=self.stall_s)
        try:
            remote = await self._allocate_remote(peer, shape, num_blocks, request_id)
        except BaseException:
            self.book.release(local.handle_id)
            raise
        self._routes[local.handle_id] = _Route(peer.region.name, remote)
        return local

    async def _allocate_remote(self, peer: _Peer, shape: BlockShape, num_blocks: int,
                               request_id: str) -> KVHandleInfo:
        request = ipb.AllocateRequest(block_dims=shape_to_dims(shape), dtype=shape.dtype,
                                      num_blocks=num_blocks, request_id=request_id, source=self.name)
        try:
            reply = await peer.stub.Allocate(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise KVPoolFullError(f"{peer.region.name}: {exc.details()}") from None
            raise CrossNodeError(f"Allocate at {peer.region.name} failed: {exc.code().name}: {exc.details()}",
                                 _unreachable(exc.code())) from None
        try:
            remote = handle_from_pb(reply)
            _check_remote(remote, shape, num_blocks, peer.region)
        except ValueError as exc:
            self._spawn(self._release_remote(peer.region.name, reply.handle_id))
            raise CrossNodeError(f"{peer.region.name} answered a bad handle: {exc}",
                                 grpc.StatusCode.INTERNAL) from None
        return remote

    async def push(self, request: ipb.PushRequest) -> ipb.PushResponse:
        """WRITE layers [layer_start, layer_end) of blocks [block_start, block_end) to the destination."""
        route = self._route(request.handle_id)
        local = self.book.info(request.handle_id)
        spans = _spans(local, route.remote, request)
        self.book.touch(request.handle_id)
        route.pushes += 1
        try:
            seconds = await self.link.write(route.peer, spans, PROGRESS + route.remote.handle_id.encode(),
                                            self.transfer_timeout_s)
        except (TransferFailedError, TransferTimeoutError) as exc:
            self.release(request.handle_id)
            code = (grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(exc, TransferTimeoutError)
                    else grpc.StatusCode.UNAVAILABLE)
            raise CrossNodeError(f"KV transfer of handle {request.handle_id} to {route.peer} failed "
                                 f"(blocks freed on both sides): {exc}", code) from None
        finally:
            route.pushes -= 1
            if route.dropped and not route.pushes:
                self._spawn(self._release_remote(route.peer, route.remote.handle_id))
        if request.handle_id in self._routes:
            self.book.touch(request.handle_id)
        return ipb.PushResponse(bytes=sum(length for _, _, length in spans), seconds=seconds)

    async def complete(self, handle_id: str, num_tokens: int) -> ipb.KVHandle:
        """Every push done: mark the destination's blocks ready, free ours -> the destination's handle."""
        route = self._route(handle_id)
        if route.pushes:
            raise CrossNodeError(f"handle {handle_id} still has {route.pushes} pushes in flight",
                                 grpc.StatusCode.FAILED_PRECONDITION)
        peer = self._peers.get(route.peer)
        try:
            if peer is None:
                raise CrossNodeError(f"peer {route.peer} is gone", grpc.StatusCode.UNAVAILABLE)
            reply = await peer.stub.MarkReady(ipb.KVHandle(handle_id=route.remote.handle_id,
                                                           num_tokens=num_tokens), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            self.release(handle_id)
            raise CrossNodeError(f"MarkReady at {route.peer} failed (blocks freed on both sides): "
                                 f"{exc.code().name}: {exc.details()}", _unreachable(exc.code())) from None
        except BaseException:
            self.release(handle_id)
            raise
        self._routes.pop(handle_id, None)
        self.book.release(handle_id)
        if not reply.agent:
            reply.agent = peer.address
        return reply

    def release(self, handle_id: str) -> int:
        """Free an outbound handle here and (after any push in flight) at its destination -> blocks
        freed here (0 if it was already gone)."""
        blocks = self.book.release(handle_id) if self.book.is_live(handle_id) else 0
        self._drop_route(handle_id)
        return blocks

    def drop_dead_routes(self) -> None:
        """Routes whose local handle went (released for its request, reclaimed): free the remote side."""
        for handle_id in [h for h in self._routes if not self.book.is_live(h)]:
            self._drop_route(handle_id)
        for handle_id in [h for h in self._inbound if not self.book.is_live(h)]:
            del self._inbound[handle_id]

    def _drop_route(self, handle_id: str) -> None:
        route = self._routes.pop(handle_id, None)
        if route is None:
            return
        route.dropped = True
        if not route.pushes:
            self._spawn(self._release_remote(route.peer, route.remote.handle_id))

    def _route(self, handle_id: str) -> _Route:
        route = self._routes.get(handle_id)
        if route is None:
            self.book.info(handle_id)  # UnknownHandleError for a handle that is gone
            raise CrossNodeError(f"handle {handle_id} was allocated without a destination",
                                 grpc.StatusCode.FAILED_PRECONDITION)
        return route

    async def _release_remote(self, peer_name: str, remote_id: str) -> None:
        peer = self._peers.get(peer_name)
        if peer is None:
            return
        try:
            await peer.stub.Release(ipb.KVHandle(handle_id=remote_id), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # its stall sweep reclaims them
                log.warning("%s: releasing handle %s at %s failed: %s", self.name, remote_id, peer_name,
                            exc.code().name)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- inbound ------------------------------------------------------------------------------------

    def allocate_in(self, shape: BlockShape, num_blocks: int, request_id: str, source: str) -> KVHandleInfo:
        """Blocks a registered peer will write: reclaimed if it stalls for stall_s."""
        if source not in self._peers:
            raise PermissionError(f"agent {source!r} has not connected to {self.name}; transfers are "
                                  f"accepted only from registered peers")
        info = self.book.allocate(shape, num_blocks, request_id, stall_s=self.stall_s)
        self._inbound[info.handle_id] = source
        return info

    async def _poll_notifs(self) -> None:
        while True:
            await asyncio.sleep(NOTIF_POLL_S)
            try:
                for source, messages in self.link.notifs().items():
                    source = source.decode() if isinstance(source, bytes) else source
                    for message in messages:
                        self._progress(source, message)
            except Exception:  # a poller that died would let every inbound transfer stall out
                log.exception("%s: polling NIXL notifications failed", self.name)

    def _progress(self, source: str, message: bytes) -> None:
        if not message.startswith(PROGRESS):
            return
        handle_id = message[len(PROGRESS):].decode(errors="replace")
        if self._inbound.get(handle_id) == source and self.book.is_live(handle_id):
            self.book.touch(handle_id)


def _spans(local: KVHandleInfo, remote: KVHandleInfo, request: ipb.PushRequest) -> list[tuple[int, int, int]]:
    """(local offset, remote offset, length) of each block's layer range; ValueError for bad ranges.

    A block is [num_layers, 2, block_size, kv_heads, head_dim]: layers [a, b) of it are one run
    of (b - a) * layer_bytes bytes starting a * layer_bytes in.
    """
    shape = local.shape
    if not 0 <= request.layer_start < request.layer_end <= shape.num_layers:
        raise ValueError(f"layers [{request.layer_start}, {request.layer_end}) are not within the "
                         f"{shape.num_layers} layers of handle {local.handle_id}")
    if not 0 <= request.block_start < request.block_end <= local.num_blocks:
        raise ValueError(f"blocks [{request.block_start}, {request.block_end}) are not within the "
                         f"{local.num_blocks} blocks of handle {local.handle_id}")
    layer_bytes = shape.nbytes // shape.num_layers
    start, length = request.layer_start * layer_bytes, (request.layer_end - request.layer_start) * layer_bytes
    return merge_spans([(local.offsets[b] + start, remote.offsets[b] + start, length)
                        for b in range(request.block_start, request.block_end)])


def _check_info(info: ipb.AgentInfo) -> None:
    if not _NAME.fullmatch(info.name):
        raise ValueError(f"AgentInfo.name must be 1-64 characters of [A-Za-z0-9._-], got {info.name!r}")
    if not 0 < len(info.nixl_metadata) <= MAX_METADATA_BYTES:
        raise ValueError(f"AgentInfo.nixl_metadata must be 1 to {MAX_METADATA_BYTES} bytes, "
                         f"got {len(info.nixl_metadata)}")
    if info.pool_nbytes <= 0 or info.pool_address <= 0:
        raise ValueError("AgentInfo.pool_address and pool_nbytes must be positive")
    host, sep, port = info.address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"AgentInfo.address must be HOST:PORT, got {info.address!r}")


def _check_remote(remote: KVHandleInfo, shape: BlockShape, num_blocks: int, region: PeerRegion) -> None:
    if remote.shape != shape or remote.num_blocks != num_blocks:
        raise ValueError(f"{remote.num_blocks} blocks of {remote.shape} for a request of {num_blocks} "
                         f"of {shape}")
    for offset in remote.offsets:
        if offset + shape.nbytes > region.nbytes:
            raise ValueError(f"block offset {offset} + {shape.nbytes} runs past its pool of "
                             f"{region.nbytes} bytes")


def _unreachable(code: grpc.StatusCode) -> grpc.StatusCode:
    """A peer's failure as this agent reports it: its own refusals pass through, the rest are UNAVAILABLE."""
    passed = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION)
    return code if code in passed else grpc.StatusCode.UNAVAILABLE
