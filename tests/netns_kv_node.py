"""One side of a KV hand-off, run as its own process on a "node" (a network namespace, or this one).

    python tests/netns_kv_node.py send AGENT DESTINATION SPECS_JSON   -> the handles (JSON)
    python tests/netns_kv_node.py fetch AGENT HANDLES_JSON OUT_DIR    -> each handle's bytes in OUT_DIR
    python tests/netns_kv_node.py generate PROXY JOBS_JSON                 -> each job's tokens (JSON)
    python tests/netns_kv_node.py stats AGENT                              -> its handles and bytes held

send streams, for each [seed, num_blocks] of SPECS, a fake device KV cache (seeded, so any
process can rebuild it: device_kv) layer by layer into AGENT's pool with DESTINATION (another
node's agent) as the KV's destination, as a prefill instance does; fetch reads each handle's
blocks from AGENT's pool as a decode instance does, writes them to OUT_DIR/<seed>.bin and releases
them; both go through NodeLocalTransport, so they carry the internal token when
$TOKENPOOL_INTERNAL_TOKEN_FILE names one. generate streams each [model, prompt,
max_tokens] job through the proxy at PROXY (greedy, all at once) as a client on that host.
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


def send(transport: NodeLocalTransport, destination: str, seed: int, num_blocks: int) -> dict:
    kv, ids = device_kv(seed), block_ids(num_blocks)
    pushed = transport.pushed_bytes
    stream = transport.begin(f"netns-{seed}", SHAPE, num_blocks, destination=destination)
    half = max(1, num_blocks // 2)
    for first, chunk in ((0, ids[:half]), (half - 1, ids[half - 1:])):  # a chunked prefill
        for layer in range(SHAPE.num_layers):
            stream.put(layer, first, kv[layer], chunk)
    handle = stream.finish(num_blocks * SHAPE.block_size)
    return {"seed": seed, "handle_id": handle.handle_id, "offsets": list(handle.offsets),
            "num_tokens": handle.num_tokens, "agent": handle.agent,
            "pushed_bytes": transport.pushed_bytes - pushed}


def fetch(transport: NodeLocalTransport, handle: dict, out: Path) -> None:
    info = KVHandleInfo(handle["handle_id"], tuple(handle["offsets"]), SHAPE, handle["num_tokens"],
                        handle["agent"])
    views = transport.fetch(info)
    (out / f"{handle['seed']}.bin").write_bytes(b"".join(v.contiguous().numpy().tobytes() for v in views))
    if not transport.release(info):
        raise SystemExit(f"handle {info.handle_id} was gone before its release")


def stats(agent: str) -> dict:
    import grpc
    from tokenpool.cli.internal_token import metadata
    from tokenpool.protos.internal.v1 import instances_pb2 as ipb
    from tokenpool.protos.internal.v1 import instances_pb2_grpc

    with grpc.insecure_channel(agent) as channel:
        reply = instances_pb2_grpc.KVTransferStub(channel).Stats(ipb.StatsRequest(), timeout=10,
                                                                  metadata=metadata())
        return {"handles": reply.handles, "used_bytes": reply.used_bytes}


def generate(proxy: str, jobs: list) -> list[list[int]]:
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from tokenpool.protos.v1 import inference_pb2 as pb
    from tokenpool.protos.v1 import inference_pb2_grpc

    def one(job) -> list[int]:
        model, prompt, n = job
        request = pb.GenerateRequest(model=model, text=prompt,
                                     sampling=pb.SamplingParams(max_tokens=n, ignore_eos=True))
        return [t for r in stub.Generate(request, timeout=60) for t in r.token_ids]

    with grpc.insecure_channel(proxy) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(one, jobs))


def main(argv: list[str]) -> int:
    if argv[0] == "send":
        with NodeLocalTransport(argv[1]) as transport:
            handles = [send(transport, argv[2], seed, n) for seed, n in json.loads(argv[3])]
        print(json.dumps(handles), flush=True)
    elif argv[0] == "fetch":
        with NodeLocalTransport(argv[1]) as transport:
            for handle in json.loads(argv[2]):
                fetch(transport, handle, Path(argv[3]))
    elif argv[0] == "stats":
        print(json.dumps(stats(argv[1])), flush=True)
    elif argv[0] == "generate":
        print(json.dumps(generate(argv[1], json.loads(argv[2]))), flush=True)
    else:
        raise SystemExit(f"unknown op {argv[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
