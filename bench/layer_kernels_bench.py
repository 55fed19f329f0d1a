"""Per-op time of the fused decoder-layer kernels (cpu_layer_kernels) against the torch
code they replace, at SmolLM2-135M's shapes and a decode step's token counts.

Both variants run in the same process on the same tensors, interleaved round by round, so
the ratio holds on a busy machine even when the absolute times drift.

    python -m tokenpool.bench.layer_kernels_bench --json out/layer_kernels.json
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
import torch.nn.functional as F
from tokenpool.engine import cpu_layer_kernels as kernels

EPS = 1e-5


@dataclass(frozen=True)
class Shapes:
    """One decoder layer: SmolLM2-135M by default."""

    hidden: int = 576
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    intermediate: int = 1536


@dataclass(frozen=True)
class Row:
    op: str
    tokens: int
    torch_us: float  # model.py's torch code
    fused_us: float  # the cpu_layer_kernels call, wrapper included

    @property
    def speedup(self) -> float:
        return self.torch_us / self.fused_us


def variants(s: Shapes, tokens: int, dtype: torch.dtype) -> dict[str, tuple[Callable, Callable]]:
    """{op: (torch code, fused call)} on fresh random inputs of one step of `tokens` tokens."""
    x, residual = torch.randn(tokens, s.hidden).to(dtype), torch.randn(tokens, s.hidden).to(dtype)
    weight = torch.randn(s.hidden).to(dtype)
    q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
    q, k, _ = torch.randn(tokens, q_size + 2 * kv_size).to(dtype).split([q_size, kv_size, kv_size], -1)
    q, k = q.view(tokens, s.heads, s.head_dim), k.view(tokens, s.kv_heads, s.head_dim)
    angles = torch.randn(tokens, 1, s.head_dim)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    gate_up = torch.randn(tokens, 2 * s.intermediate).to(dtype)

    def torch_silu_mul():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    rotate = kernels._rotate
    return {
        "rms_norm": (lambda: F.rms_norm(x, weight.shape, weight, EPS),
                     lambda: kernels.rms_norm(x, weight, EPS)),
        # the model's `x = x + h` then a norm; the fused call adds into residual in place
        "add_rms_norm": (lambda: F.rms_norm(residual + x, weight.shape, weight, EPS),
                         lambda: kernels.add_rms_norm(x, residual, weight, EPS)),
        "rotary": (lambda: (rotate(q, cos, sin), rotate(k, cos, sin)),
                   lambda: kernels.rotary(q, k, cos, sin)),
        "silu_mul": (torch_silu_mul, lambda: kernels.silu_mul(gate_up)),
    }


@torch.inference_mode()
def bench_tokens(s: Shapes, tokens: int, dtype: torch.dtype, rounds: int) -> list[Row]:
    """Median microseconds per call of each op's two variants."""
    rows = []
    for op, (reference, fused) in variants(s, tokens, dtype).items():
        samples: tuple[list[float], list[float]] = ([], [])
        for _ in range(rounds):
            samples[0].append(_time_us(reference))
            samples[1].append(_time_us(fused))
        row = Row(op, tokens, statistics.median(samples[0]), statistics.median(samples[1]))
        _log(f"  {op} T={tokens}: torch {row.torch_us:.1f} us, fused {row.fused_us:.1f} us")
        rows.append(row)
    return rows


def _time_us(fn: Callable, min_s: float = 0.02) -> float:
    """Microseconds per call, averaged over as many calls as fit in about min_s."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s:
        fn()
        calls += 1
    return elapsed / calls * 1e6


def add_parser(commands) -> None:
    p = commands.add_parser("layer-kernels", help="fused decoder-layer kernels against torch's ops")
    _arguments(p)
    p.set_defaults(run=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument("--tokens", default="1,8,32", help="comma-separated token counts (decode batch sizes)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds; the median counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> None:
    if not kernels.available():
        raise ValueError(f"the fused kernels cannot be built here: {kernels.unavailable_reason()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    if min(tokens) < 1 or args.rounds < 1:
        raise ValueError(f"--tokens and --rounds must be positive; got {args.tokens!r}, {args.rounds}")
    rows = [r for t in tokens for r in bench_tokens(Shapes(), t, getattr(torch, args.dtype), args.rounds)]
    report = {"shapes": asdict(Shapes()), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "rows": [asdict(r) | {"speedup": r.speedup} for r in rows]}
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


def print_table(report: dict) -> None:
    s = report["shapes"]
    print(f"\ndecoder-layer elementwise ops: hidden {s['hidden']}, {s['heads']}/{s['kv_heads']} heads "
          f"x {s['head_dim']}, intermediate {s['intermediate']}, {report['dtype']}, "
          f"{report['threads']} threads, median of {report['rounds']} rounds")
    print(f"{'op':<14}{'tokens':>7}{'torch us':>10}{'fused us':>10}{'speedup':>9}")
    for r in report["rows"]:
        print(f"{r['op']:<14}{r['tokens']:>7}{r['torch_us']:>10.1f}{r['fused_us']:>10.1f}{r['speedup']:>8.1f}x")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenpool.bench.layer_kernels_bench",
                                     description=__doc__)
    _arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
