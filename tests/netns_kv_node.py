"""One side of a KV hand-off, run as its own process on a "node" (a network namespace, or this one).

    python tests/netns_kv_node.py send AGENT DESTINATION SEED NUM_BLOCKS   -> prints the handle (JSON)
    python tests/netns_kv_node.py fetch AGENT HANDLE_JSON OUT              -> the blocks' bytes in OUT

send streams a fake device KV cache (seeded, so any process can rebuild it: device_kv) layer by
layer into AGENT's pool with DESTINATION (another node's agent) as the KV's destination, as a
prefill instance does; fetch reads the handle's blocks from AGENT's pool as a decode instance
does, writes them to OUT and releases them. Both go through NodeLocalTransport, so they carry the
internal token when $TOKENPOOL_INTERNAL_TOKEN_FILE names one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenpool.engine.slab_allocator import BlockShape
from tokenpool.kvtransfer.handle import KVHandleInfo
from tokenpool.kvtransfer.transport import NodeLocalTransport

SHAPE = BlockShape(num_layers=4, block_size=16, num_kv_heads=2, head_dim=8, dtype="float32")
DEVICE_BLOCKS = 12


def device_kv(seed: int) -> torch.Tensor:
    """[num_layers, 2, DEVICE_BLOCKS, block_size, kv_heads, head_dim] of seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE.num_layers, 2, DEVICE_BLOCKS, *SHAPE.dims[2:], generator=g)


def block_ids(num_blocks: int) -> list[int]:
    """The sequence's device blocks: scattered, as a paged cache hands them out."""
    return [(7 * i + 3) % DEVICE_BLOCKS for i in range(num_blocks)]


def send(agent: str, destination: str, seed: int, num_blocks: int) -> dict:
    kv, ids = device_kv(seed), block_ids(num_blocks)
    with NodeLocalTransport(agent) as transport:
        stream = transport.begin(f"netns-{seed}", SHAPE, num_blocks, destination=destination)
        half = max(1, num_blocks // 2)
        for first, chunk in ((0, ids[:half]), (half - 1, ids[half - 1:])):  # a chunked prefill
            for layer in range(SHAPE.num_layers):
                stream.put(layer, first, kv[layer], chunk)
        handle = stream.finish(num_blocks * SHAPE.block_size)
        return {"handle_id": handle.handle_id, "offsets": list(handle.offsets),
                "num_tokens": handle.num_tokens, "agent": handle.agent,
                "pushed_bytes": transport.pushed_bytes}


def fetch(agent: str, handle: dict, out: Path) -> None:
    info = KVHandleInfo(handle["handle_id"], tuple(handle["offsets"]), SHAPE, handle["num_tokens"],
                        handle["agent"])
    with NodeLocalTransport(agent) as transport:
        views = transport.fetch(info)
        out.write_bytes(b"".join(v.contiguous().numpy().tobytes() for v in views))
        if not transport.release(info):
            raise SystemExit(f"handle {info.handle_id} was gone before its release")


def main(argv: list[str]) -> int:
    if argv[0] == "send":
        print(json.dumps(send(argv[1], argv[2], int(argv[3]), int(argv[4]))), flush=True)
    elif argv[0] == "fetch":
        fetch(argv[1], json.loads(argv[2]), Path(argv[3]))
    else:
        raise SystemExit(f"unknown op {argv[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
