"""`tokenpool profile`: measure this machine's latency profile of some models, as instances do.

    tokenpool profile --model smollm2-135m-instruct --model tiny-llama --threads 1 --json cpu.json

The engine is built as an instance builds it (same flags), and every model is profiled
with the instances' own code (step and prefill time models fitted to runs of the real
engine, cached under ~/.cache/tokenpool/profiles, so an instance started later with the
same shape and threads predicts with the same numbers) plus the host-to-arena copy
bandwidth. The file is what `tokenpool sim --profile` and `tokenpool bench serve
--sim-profile` read.

With --live-clock, also what a simulated clock needs to replay a live run on this machine:
each model's decode steps by batch size (StepTable: one-thread CPU steps are concave in the
batch, a line is not), how long a sequence's KV takes to swap out to the host pool and back
(KVSwapTime: a switch waits for both), what a prefetch copy costs the compute beside it,
and the serving path's own costs, measured through a stack serving all the models
(bench/serving_overhead.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from .instance_setup import add_engine_args, build_engine

PROBE_CONTEXT = 128  # the table's example: one sequence at this context, a prompt this long


def add_parser(commands) -> None:
    p = commands.add_parser("profile", help="measure this machine's latency profile of models (for `sim`)")
    p.add_argument("--model", action="append", default=[], metavar="ID[=FOLDER]",
                   help="a model to profile (repeatable; default: the built-in catalogue)")
    add_engine_args(p, kv_mib=64, host_kv_mib=64)
    p.add_argument("--fresh", action="store_true", help="measure again even if a cached profile exists")
    p.add_argument("--live-clock", action="store_true",
                   help="also measure decode steps by batch size and the serving path's overhead through a "
                        "live stack, for simulating live runs on this machine (a minute or more)")
    p.add_argument("--json", type=Path, required=True, help="where to write the profile")
    p.set_defaults(run=run)


def run(args) -> None:
    import msgspec
    import torch
    from tokenpool.bench.serve_bench import machine
    from tokenpool.engine.step_profiler import (
        InstanceTimings,
        measure_kv_swap,
        measure_prefetch_factor,
        measure_step_table,
    )
    from tokenpool.engine.step_time_model import ProfileCache

    from .serve_command import catalogue

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    folders = catalogue(args.model)
    engine = build_engine(args, folders)
    print(f"profiling {len(folders)} models on {torch.get_num_threads()} threads "
          "(a few seconds each unless cached)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="tokenpool-profile-") as scratch:
        timings = InstanceTimings.measure(engine, ProfileCache(Path(scratch)) if args.fresh else None)
    threads = torch.get_num_threads()
    meta = {"machine": machine(), "threads": threads, "device": args.device,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": args.command_line}
    if args.live_clock:
        from tokenpool.bench import serving_overhead

        tables = per_shape(engine, measure_step_table, "decode steps by batch size")
        swaps = per_shape(engine, measure_kv_swap, "KV swap out and in")
        print("measuring what a prefetch copy costs the compute beside it", file=sys.stderr, flush=True)
        prefetch = measure_prefetch_factor(engine, timings.copy_gbps)
        del engine  # its memory and threads; the stack's instances build their own
        measured = serving_overhead.measure(folders, timings.profiles, threads,
                                            step=lambda m, sum_len, batch: tables[m].predict(sum_len, batch))
        overhead = msgspec.structs.replace(measured.overhead, prefetch_factor=prefetch)
        timings = InstanceTimings(timings.profiles, timings.copy_gbps, overhead, tables, swaps)
        meta["serving_measurement"] = measured.to_json()
    data = timings.to_json(**meta)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.json)
    print_profile(timings)
    print(f"wrote {args.json}")


def per_shape(engine, measure, what: str) -> dict:
    """measure(engine, model) for each model, once per shape (models of one shape share it)."""
    from tokenpool.engine.step_profiler import profile_key

    by_shape, results = {}, {}
    for model in engine.models:
        key = profile_key(engine, model)
        if key not in by_shape:
            print(f"measuring {model}'s {what}", file=sys.stderr, flush=True)
            by_shape[key] = measure(engine, model)
        results[model] = by_shape[key]
    return results


def print_profile(timings) -> None:
    from tokenpool.engine.step_time_model import ServingOverhead

    head = ("model", "weights MB", f"step@{PROBE_CONTEXT} ms", f"prefill {PROBE_CONTEXT} ms", "switch ms")
    if timings.step_tables:
        head += ("table 1/4/8 seqs ms", "line 1/4/8 seqs ms")
    if timings.kv_swap:
        head += (f"KV out/in {PROBE_CONTEXT} tok ms",)
    print("".join(f"{h:>24}" for h in head))
    for model, profile in timings.profiles.items():
        cells = (model, f"{profile.weight_bytes / 1e6:.1f}",
                 f"{profile.decode.predict(PROBE_CONTEXT, 1) * 1e3:.2f}",
                 f"{profile.prefill.predict(PROBE_CONTEXT) * 1e3:.2f}",
                 f"{timings.switch_seconds(model) * 1e3:.2f}")
        if model in timings.step_tables:
            cells += tuple("/".join(f"{predict(n * PROBE_CONTEXT, n) * 1e3:.1f}" for n in (1, 4, 8))
                           for predict in (timings.step_tables[model].predict, profile.decode.predict))
        if model in timings.kv_swap:
            cells += ("/".join(f"{timings.kv_swap_seconds(model, PROBE_CONTEXT, d) * 1e3:.2f}"
                               for d in ("out", "in")),)
        print("".join(f"{c:>24}" for c in cells))
    print(f"copy bandwidth {timings.copy_gbps:.1f} GB/s")
    serving = timings.serving
    if serving != ServingOverhead():  # measured (--live-clock)
        print(f"serving overhead: first token +{serving.request_s * 1e3:.1f} ms, decode step "
              f"+{serving.step_s * 1e3:.2f} ms +{serving.token_s * 1e3:.2f} ms per sequence, "
              f"x{serving.corun_decode_factor:.2f} +{serving.corun_step_s * 1e3:.2f} ms while a prefill "
              "computes; prefill "
              f"x{serving.corun_prefill_factor:.2f} while a decode instance has work; a prefetch copy "
              f"costs the compute beside it {serving.prefetch_factor:.2f} s per second of copy")
