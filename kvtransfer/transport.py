"""KVTransport: how an instance publishes a sequence's KV blocks and how another fetches them.

    prefill:  handle = transport.publish(request_id, shape, blocks, num_tokens)   -> KVHandle to the proxy
          or  stream = transport.begin(request_id, shape, num_blocks); stream.put(layer, ...) while
              the prefill computes; handle = stream.finish(num_tokens)               (kv_stream.py)
    decode:   views = transport.fetch(handle); copy them into device KV; transport.release(handle)

NodeLocalTransport goes through the node's KVTransferAgent (control over gRPC, bytes through the
shared pool file). Given a destination (another node's agent), the same calls move the KV there:
this node's agent Pushes the blocks over NIXL as they are written, and the handle answered is the
destination's, which a decode instance on that node fetches like any node-local one.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch
from tokenpool.cli import internal_tls
from tokenpool.engine.slab_allocator import BlockShape, KVPoolFullError
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.telemetry.grpc_tracing import intercept

from .handle import KVHandleInfo, handle_from_pb, shape_to_dims
from .kv_stream import KVStream
from .pool_attachment import PoolAttachment

TRANSPORT_KINDS = ("node-local",)  # cross-node is node-local plus a destination (the agents' NIXL)


class KVTransferError(RuntimeError):
    """A hand-off failed: the agent refused or was unreachable, or sent a handle that cannot be used.

    code: the gRPC status of the failed call, or None when the failure was not a call's.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class KVTransport(ABC):
    """Publishes and fetches KV blocks of shape [num_layers, 2, block_size, num_kv_heads, head_dim].

    Methods are synchronous (engine threads call them) and thread-safe.
    """

    kind = ""  # the name make_transport knows it by (traces record the hand-off's path)

    @abstractmethod
    def publish(self, request_id: str, shape: BlockShape, blocks: Sequence[torch.Tensor],
                num_tokens: int, destination: str = "") -> KVHandleInfo:
        """Allocate len(blocks) pool blocks, copy blocks[i] (each a tensor of shape.dims, shape.torch_dtype,
        may be a non-contiguous view) into block i, mark ready. On any failure release what was allocated
        and raise (KVPoolFullError when the pool is full, KVTransferError otherwise). ValueError, before
        anything is allocated, for no blocks, blocks of the wrong shape or dtype, or num_tokens they
        cannot hold. destination: another node's agent (HOST:PORT) to move the blocks to; the handle
        returned is then that node's."""

    @abstractmethod
    def begin(self, request_id: str, shape: BlockShape, num_blocks: int, destination: str = "") -> KVStream:
        """Allocate num_blocks pool blocks (and at the destination, if given) to fill layer by layer:
        a KVStream. KVPoolFullError or KVTransferError, nothing held, when they cannot be had."""

    @abstractmethod
    def fetch(self, handle: KVHandleInfo) -> list[torch.Tensor]:
        """Views of the handle's blocks (shape.dims each); valid until release. KVTransferError for a
        handle whose offsets do not lie in the pool."""

    @abstractmethod
    def release(self, handle: KVHandleInfo) -> bool:
        """Free the handle's blocks -> False if the agent no longer knew it (already released, or
        reclaimed when its lease ran out: views fetched from it may have been overwritten since)."""

    @abstractmethod
    def renew(self, handle_ids: Sequence[str]) -> list[str]:
        """The receiver's heartbeat: hold these handles another lease -> the ids the agent no longer
        knows (released or reclaimed)."""

    def close(self) -> None:  # noqa: B027 - a transport without connections has nothing to close
        """Drop connections and mappings; views already fetched stay readable."""

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NodeLocalTransport(KVTransport):
    """The hand-off through this node's host KV pool, via the KVTransferAgent at agent_address.

    Describes the pool and maps its file at construction (KVTransferError if the agent does not
    answer, PermissionError/ValueError if the file is not one to trust). A call the agent does not
    answer within timeout_s fails with KVTransferError (code DEADLINE_EXCEEDED); blocks it may have
    allocated meanwhile are reclaimed by its ttl sweep.
    """

    kind = "node-local"

    def __init__(self, agent_address: str, timeout_s: float = 10.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.agent_address = agent_address
        self.timeout_s = timeout_s
        self.pushed_bytes = 0  # moved to other nodes by the agent's NIXL WRITEs, and the time they took
        self.push_seconds = 0.0
        self._stats_lock = threading.Lock()
        self._channel = internal_tls.sync_channel(agent_address)
        self._stub = instances_pb2_grpc.KVTransferStub(intercept(self._channel))  # carries the trace
        try:
            info = self._call("Describe", ipb.DescribeRequest())
            self.attachment = PoolAttachment(Path(info.path), info.nbytes)
            # Its handles name it by the address it serves at, which may not be the one dialled
            # here (a DNS name, a node-local Service, 127.0.0.1): either is this node's agent.
            self._names = {agent_address, info.address} - {""}
        except BaseException:
            self._channel.close()
            raise

    def publish(self, request_id: str, shape: BlockShape, blocks: Sequence[torch.Tensor],
                num_tokens: int, destination: str = "") -> KVHandleInfo:
        blocks = list(blocks)
        _check_blocks(shape, blocks, num_tokens)
        handle = self._allocate(request_id, shape, len(blocks), destination)
        try:
            for view, block in zip(self._views(handle), blocks, strict=True):
                view.copy_(block)  # copy_ takes any strides (and devices) on either side
            if destination:
                self._push(handle, 0, shape.num_layers, 0, len(blocks))
            return self._mark_ready(handle, num_tokens)
        except KVTransferError:
            self._release_quietly(handle.handle_id)
            raise
        except Exception as exc:
            self._release_quietly(handle.handle_id)
            raise KVTransferError(f"publishing the KV of request {request_id!r} failed: {exc}") from exc
        except BaseException:
            self._release_quietly(handle.handle_id)
            raise

    def begin(self, request_id: str, shape: BlockShape, num_blocks: int, destination: str = "") -> KVStream:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        handle = self._allocate(request_id, shape, num_blocks, destination)
        try:
            views = self._views(handle)
        except BaseException:
            self._release_quietly(handle.handle_id)
            raise
        return KVStream(handle, views, self._push if destination else None, self._mark_ready,
                        lambda h: self._release_quietly(h.handle_id))

    def fetch(self, handle: KVHandleInfo) -> list[torch.Tensor]:
        if handle.agent and handle.agent not in self._names:
            raise KVTransferError(f"KV handle {handle.handle_id} lies in the pool of the agent at "
                                  f"{handle.agent}, not this node's ({self.agent_address})",
                                  grpc.StatusCode.FAILED_PRECONDITION)
        return self._views(handle)

    def release(self, handle: KVHandleInfo) -> bool:
        if handle.agent and handle.agent not in self._names:
            return True  # not this node's (never fetched here): the proxy's clean-up releases it there
        try:
            self._call("Release", ipb.KVHandle(handle_id=handle.handle_id))
        except KVTransferError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return True

    def renew(self, handle_ids: Sequence[str]) -> list[str]:
        reply = self._call("Renew", ipb.RenewRequest(handle_ids=handle_ids))
        return list(reply.unknown_handle_ids)

    def close(self) -> None:
        self._channel.close()
        self.attachment.close()

    def _allocate(self, request_id: str, shape: BlockShape, num_blocks: int,
                  destination: str = "") -> KVHandleInfo:
        request = ipb.AllocateRequest(block_dims=shape_to_dims(shape), dtype=shape.dtype,
                                      num_blocks=num_blocks, request_id=request_id, destination=destination)
        try:
            reply = self._call("Allocate", request)
        except KVTransferError as exc:
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise KVPoolFullError(str(exc)) from None
            raise
        handle = self._parse(reply)
        if handle.shape != shape or handle.num_blocks != num_blocks:
            self._release_quietly(handle.handle_id)
            raise KVTransferError(f"the agent at {self.agent_address} allocated {handle.num_blocks} blocks "
                                  f"of {handle.shape} for a request of {num_blocks} blocks of {shape}")
        return handle

    def _mark_ready(self, handle: KVHandleInfo, num_tokens: int) -> KVHandleInfo:
        request = ipb.KVHandle(handle_id=handle.handle_id, num_tokens=num_tokens)
        return self._parse(self._call("MarkReady", request))

    def _push(self, handle: KVHandleInfo, layer_start: int, layer_end: int, block_start: int,
              block_end: int) -> None:
        """Have the agent move those layers of those blocks to the handle's destination (NIXL)."""
        reply = self._call("Push", ipb.PushRequest(handle_id=handle.handle_id, layer_start=layer_start,
                                                   layer_end=layer_end, block_start=block_start,
                                                   block_end=block_end), timeout_s=2 * self.timeout_s)
        with self._stats_lock:
            self.pushed_bytes += reply.bytes
            self.push_seconds += reply.seconds

    def _views(self, handle: KVHandleInfo) -> list[torch.Tensor]:
        try:
            return self.attachment.views(handle.offsets, handle.shape)
        except ValueError as exc:
            raise KVTransferError(f"KV handle {handle.handle_id} does not fit the pool: {exc}") from exc

    def _parse(self, reply: ipb.KVHandle) -> KVHandleInfo:
        try:
            return handle_from_pb(reply)
        except ValueError as exc:
            if reply.handle_id:
                self._release_quietly(reply.handle_id)
            raise KVTransferError(f"the agent at {self.agent_address} sent a bad KV handle: {exc}") from exc

    def _release_quietly(self, handle_id: str) -> None:
        """Best effort on a failure path: the error being raised matters more; the ttl sweep backs it up."""
        try:
            self._call("Release", ipb.KVHandle(handle_id=handle_id))
        except KVTransferError:
            pass

    def _call(self, method: str, request, timeout_s: float | None = None):
        try:
            return getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            raise KVTransferError(f"KVTransfer.{method} at {self.agent_address} failed: "
                                  f"{exc.code().name}: {exc.details()}", exc.code()) from None


def _check_blocks(shape: BlockShape, blocks: list[torch.Tensor], num_tokens: int) -> None:
    """ValueError naming the first block or count that does not fit `shape`."""
    if not blocks:
        raise ValueError("publish needs at least one block")
    for i, block in enumerate(blocks):
        if tuple(block.shape) != shape.dims or block.dtype != shape.torch_dtype:
            raise ValueError(f"blocks[{i}] is {tuple(block.shape)} {block.dtype}; expected "
                             f"{shape.dims} {shape.torch_dtype}")
    if not 0 <= num_tokens <= len(blocks) * shape.block_size:
        raise ValueError(f"num_tokens={num_tokens} does not fit {len(blocks)} blocks of "
                         f"{shape.block_size} tokens")


def make_transport(kind: str, address: str) -> KVTransport:
    """A transport by name: "node-local" (address: the node's KVTransferAgent, host:port)."""
    if kind == "node-local":
        return NodeLocalTransport(address)
    raise ValueError(f"unknown KV transport kind {kind!r}; expected one of: {', '.join(TRANSPORT_KINDS)} "
                     f"(cross-node NIXL transfer is not built yet)")
