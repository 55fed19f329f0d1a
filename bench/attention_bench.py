"""`tokenpool bench attention`: one layer's decode attention, gather + masked SDPA (the
'sdpa' backend) against the fused paged kernel, at SmolLM2-135M's shapes.

Both run in the same process on the same cache, interleaved round by round, so the
ratio holds on a busy machine even when the absolute times drift.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenpool.engine.attention import AttentionMetadata, TorchSDPABackend, attend_mask
from tokenpool.engine.cpu_paged_attention import (
    CpuPagedBackend,
    available,
    paged_decode_attention,
    unavailable_reason,
)


@dataclass(frozen=True)
class Shapes:
    """One attention layer: SmolLM2-135M by default."""

    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    block_size: int = 16


@dataclass(frozen=True)
class Row:
    batch: int
    context: int
    sdpa_us: float  # gather K, gather V, masked SDPA
    fused_us: float  # the kernel, seq_lens given (what the runner passes)
    fused_mask_us: float  # CpuPagedBackend._decode recovering seq_lens from decode_mask

    @property
    def speedup(self) -> float:
        return self.sdpa_us / self.fused_us


@dataclass(frozen=True)
class Case:
    """A decode step's inputs: every sequence holds `context` tokens, blocks shuffled."""

    q: torch.Tensor  # [B, H, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor
    seq_lens: torch.Tensor  # [B]
    meta: AttentionMetadata

    @classmethod
    def make(cls, shapes: Shapes, batch: int, context: int, dtype: torch.dtype) -> Case:
        bs = shapes.block_size
        width = -(-context // bs)
        num_blocks = batch * width + 1
        cache = (num_blocks, bs, shapes.kv_heads, shapes.head_dim)
        k, v = torch.randn(cache).to(dtype), torch.randn(cache).to(dtype)
        tables = torch.randperm(num_blocks)[:batch * width].view(batch, width)
        seq_lens = torch.full((batch,), context)
        mask = attend_mask((seq_lens - 1).view(-1, 1), width * bs, None).view(batch, 1, 1, -1)
        meta = AttentionMetadata(torch.zeros(batch, dtype=torch.long), batch, tables, mask, ())
        q = torch.randn(batch, shapes.heads, shapes.head_dim).to(dtype)
        return cls(q, k, v, seq_lens, meta)


def add_parser(commands) -> None:
    p = commands.add_parser("attention", help="fused paged decode attention against gather + SDPA")
    _arguments(p)
    p.set_defaults(run=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--contexts", default="128,512", help="comma-separated context lengths")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds; the median counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> None:
    if not available():
        raise ValueError(f"the fused kernel cannot be built here: {unavailable_reason()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    if min(batches + contexts) < 1 or args.rounds < 1:
        raise ValueError("--batches, --contexts and --rounds must be positive")
    dtype = getattr(torch, args.dtype)
    rows = [bench_case(Case.make(Shapes(), b, c, dtype), args.rounds) for b in batches for c in contexts]
    report = {"shapes": asdict(Shapes()), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "rows": [asdict(r) | {"speedup": r.speedup} for r in rows]}
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


@torch.inference_mode()
def bench_case(case: Case, rounds: int) -> Row:
    """Median microseconds per call of each variant, after checking they agree."""
    sdpa, fused = TorchSDPABackend(), CpuPagedBackend()
    scale = case.q.shape[-1] ** -0.5
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa": lambda: sdpa._decode(case.q, case.k_cache, case.v_cache, case.meta).squeeze(2),
        "fused": lambda: paged_decode_attention(case.q, case.k_cache, case.v_cache,
                                                case.meta.decode_block_tables, case.seq_lens, scale),
        "fused_mask": lambda: fused._decode(case.q, case.k_cache, case.v_cache, case.meta).squeeze(2),
    }
    ref = variants["sdpa"]()
    for name in ("fused", "fused_mask"):
        err = (variants[name]().float() - ref.float()).abs().max().item()
        if err > 1e-3:
            raise RuntimeError(f"{name} differs from SDPA by {err:g}")
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_time_us(fn))
    med = {name: statistics.median(s) for name, s in samples.items()}
    _log(f"  batch {case.q.shape[0]} context {int(case.seq_lens[0])}: "
         + ", ".join(f"{n} {t:.1f} us" for n, t in med.items()))
    return Row(case.q.shape[0], int(case.seq_lens[0]), med["sdpa"], med["fused"], med["fused_mask"])


def _time_us(fn: Callable[[], torch.Tensor], min_s: float = 0.05) -> float:
    """Microseconds per call, averaged over as many calls as fit in about min_s."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s:
        fn()
        calls += 1
    return elapsed / calls * 1e6


def print_table(report: dict) -> None:
    s = report["shapes"]
    print(f"\ndecode attention, one layer: {s['heads']} heads, {s['kv_heads']} kv heads, "
          f"head_dim {s['head_dim']}, block {s['block_size']}, {report['dtype']}, "
          f"{report['threads']} threads, median of {report['rounds']} rounds")
    print(f"{'batch':>6}{'context':>9}{'gather+sdpa us':>16}{'fused us':>10}{'fused(mask) us':>16}"
          f"{'speedup':>9}")
    for r in report["rows"]:
        print(f"{r['batch']:>6}{r['context']:>9}{r['sdpa_us']:>16.1f}{r['fused_us']:>10.1f}"
              f"{r['fused_mask_us']:>16.1f}{r['speedup']:>8.1f}x")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenpool.bench.attention_bench", description=__doc__)
    _arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
