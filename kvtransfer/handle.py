"""KVHandleInfo: where a sequence's KV lies in the node's host KV pool, and its protobuf form.

The handle travels prefill -> proxy -> decode as an `internal.v1.KVHandle`; every process that
receives one checks it here before any offset is used (PoolAttachment then bounds-checks them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenpool.engine.slab_allocator import ITEMSIZE, BlockShape
from tokenpool.protos.internal.v1 import instances_pb2 as ipb

BLOCK_DIM_NAMES = ("num_layers", "block_size", "num_kv_heads", "head_dim")  # the order of block_dims


@dataclass(frozen=True)
class KVHandleInfo:
    """A handle the agent handed out: its blocks, their shape and how many tokens they hold."""

    handle_id: str
    offsets: tuple[int, ...]  # byte offsets of the blocks in the pool, in sequence order
    shape: BlockShape
    num_tokens: int  # tokens of KV the blocks hold; <= len(offsets) * shape.block_size
    agent: str = ""  # the agent (HOST:PORT) whose pool holds the blocks; "" = the receiver's node

    @property
    def num_blocks(self) -> int:
        return len(self.offsets)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the blocks can hold."""
        return len(self.offsets) * self.shape.block_size


def shape_to_dims(shape: BlockShape) -> list[int]:
    """block_dims of the protos: [num_layers, block_size, num_kv_heads, head_dim]."""
    return [getattr(shape, name) for name in BLOCK_DIM_NAMES]


def shape_from_pb(block_dims: Sequence[int], dtype: str) -> BlockShape:
    """The BlockShape of a message's block_dims and dtype; ValueError naming the bad field."""
    dims = list(block_dims)
    if len(dims) != len(BLOCK_DIM_NAMES) or any(d <= 0 for d in dims):
        raise ValueError(f"block_dims must be 4 positive numbers [{', '.join(BLOCK_DIM_NAMES)}], got {dims}")
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype must be one of {sorted(ITEMSIZE)}, got {dtype!r}")
    return BlockShape(*dims, dtype=dtype)


def handle_to_pb(h: KVHandleInfo, ready: bool = True) -> ipb.KVHandle:
    return ipb.KVHandle(handle_id=h.handle_id, block_offsets=h.offsets, block_dims=shape_to_dims(h.shape),
                        dtype=h.shape.dtype, num_tokens=h.num_tokens, ready=ready, agent=h.agent)


def handle_from_pb(msg: ipb.KVHandle) -> KVHandleInfo:
    """The handle in `msg`; ValueError naming the field when it cannot describe pool blocks.

    Offsets are not checked against a pool here (this side may not know one): PoolAttachment.views
    bounds-checks them before any memory is touched.
    """
    if not msg.handle_id:
        raise ValueError("KVHandle.handle_id is empty")
    shape = shape_from_pb(msg.block_dims, msg.dtype)
    info = KVHandleInfo(msg.handle_id, tuple(msg.block_offsets), shape, msg.num_tokens, msg.agent)
    if info.num_tokens > info.capacity_tokens:
        raise ValueError(f"KVHandle.num_tokens={info.num_tokens} exceeds what its {info.num_blocks} blocks "
                         f"of {shape.block_size} tokens hold ({info.capacity_tokens})")
    return info
