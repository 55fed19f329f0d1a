"""KV swap bandwidth: KVSwapper swap-out and swap-in GB/s against a plain memcpy of the same bytes,
and against gather-first copies (the alternative the swapper does not use), in one process.

    python -m tokenpool.bench.kv_swap_bench --json out/kv-swap.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenpool.engine.host_kv_pool import DEFAULT_SLAB_BYTES, HostKVPool
from tokenpool.engine.kv_swapper import KVSwapper
from tokenpool.engine.slab_allocator import BlockShape

SMOLLM2 = BlockShape(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype="float32")


@dataclass(frozen=True)
class Row:
    method: str  # swapper-out | swapper-in | gather-out | index-copy-in | memcpy
    blocks: int
    gbps_best: float
    gbps_median: float


def add_parser(commands) -> None:
    p = commands.add_parser("kv-swap", help="host KV pool swap bandwidth")
    _arguments(p)
    p.set_defaults(run=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument("--blocks", default="64,512", help="comma-separated blocks per swap")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--workers", type=int, default=1, help="swapper threads")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(n) for n in args.blocks.split(",")]
    if any(n < 1 for n in sizes) or args.repeats < 1:
        raise ValueError(f"--blocks must be positive and --repeats >= 1, got {args.blocks!r}, {args.repeats}")
    shape, most = SMOLLM2, max(sizes)
    kv = torch.randn(shape.num_layers, 2, 2 * most, *shape.dims[2:])  # the device cache, twice the blocks
    with HostKVPool(_pool_bytes(shape, 2 * most)) as pool, KVSwapper(pool, args.workers) as swapper:
        rows = [row for n in sizes for row in bench_size(swapper, kv, n, args.repeats)]
    report = {"shape": asdict(shape), "block_bytes": shape.nbytes, "threads": torch.get_num_threads(),
              "workers": args.workers, "repeats": args.repeats, "rows": [asdict(r) for r in rows]}
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


def _pool_bytes(shape: BlockShape, blocks: int) -> int:
    """Room for `blocks` live blocks (each size swaps out while its first copy is held)."""
    per_slab = DEFAULT_SLAB_BYTES // shape.nbytes
    return -(-blocks // per_slab) * DEFAULT_SLAB_BYTES


def bench_size(swapper: KVSwapper, kv: torch.Tensor, n: int, repeats: int) -> list[Row]:
    """Rows for n-block swaps; ids are scattered over the cache as a real sequence's would be."""
    shape, pool = SMOLLM2, swapper.pool
    ids = torch.randperm(kv.shape[2], generator=torch.Generator().manual_seed(n))[:n].tolist()
    new_ids = torch.randperm(kv.shape[2], generator=torch.Generator().manual_seed(n + 1))[:n].tolist()
    offsets = swapper.swap_out(kv, ids, shape).result()  # also warms the pool pages
    nbytes = n * shape.nbytes
    run_blocks = pool.block_view(offsets[0], shape).new_empty((n, *shape.dims))
    src, dst = torch.randn(nbytes // 4), torch.empty(nbytes // 4)

    def swap_out() -> None:
        swapper.release(swapper.swap_out(kv, ids, shape).result())

    methods = {
        "memcpy": lambda: dst.copy_(src),
        "swapper-out": swap_out,
        "swapper-in": lambda: swapper.swap_in(kv, offsets, new_ids, shape).wait(),
        "gather-out": lambda: run_blocks.copy_(kv[:, :, ids].movedim(2, 0)),
        "index-copy-in": lambda: kv.index_copy_(2, torch.tensor(new_ids), run_blocks.movedim(0, 2)),
    }
    seconds = _time_interleaved(methods, repeats)
    swapper.release(offsets)
    return [Row(m, n, nbytes / min(s) / 1e9, nbytes / statistics.median(s) / 1e9) for m, s in seconds.items()]


def _time_interleaved(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each method; round-robin so a noisy neighbour hits every method alike."""
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            if round_:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def print_table(report: dict) -> None:
    base = {r["blocks"]: r["gbps_median"] for r in report["rows"] if r["method"] == "memcpy"}
    print(f"\nKV swap, SmolLM2 shape ({report['block_bytes'] / 1024:.0f} KiB a block, float32), "
          f"{report['threads']} torch threads, {report['workers']} swap workers, "
          f"{report['repeats']} repeats")
    print(f"{'method':<15}{'blocks':>7}{'GB/s best':>11}{'GB/s median':>13}{'vs memcpy':>11}")
    for r in report["rows"]:
        ratio = r["gbps_median"] / base[r["blocks"]]
        print(f"{r['method']:<15}{r['blocks']:>7}{r['gbps_best']:>11.2f}{r['gbps_median']:>13.2f}"
              f"{ratio:>10.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
