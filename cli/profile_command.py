"""`tokenpool profile`: measure this machine's latency profile of some models, as instances do.

    tokenpool profile --model smollm2-135m-instruct --model tiny-llama --threads 1 --json cpu.json

The engine is built as an instance builds it (same flags), and every model is profiled
with the instances' own code (step and prefill time models fitted to runs of the real
engine, cached under ~/.cache/tokenpool/profiles, so an instance started later with the
same shape and threads predicts with the same numbers) plus the host-to-arena copy
bandwidth. The file is what `tokenpool sim --profile` and `tokenpool bench serve
--sim-profile` read.

With --serving, a stack serving all the models is also started and the serving path's own
costs are measured with requests for the smallest, against its profile (bench/serving_overhead.py): what the
simulator must add to replay a live CPU run.
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
    p.add_argument("--serving", action="store_true",
                   help="also measure the serving path's overhead through a live stack (for simulating "
                        "live CPU runs; about a minute)")
    p.add_argument("--json", type=Path, required=True, help="where to write the profile")
    p.set_defaults(run=run)


def run(args) -> None:
    import torch
    from tokenpool.bench.serve_bench import machine
    from tokenpool.engine.step_profiler import InstanceTimings
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
    meta = {"machine": machine(), "threads": threads, "device": "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": args.command_line}
    if args.serving:
        from tokenpool.bench import serving_overhead

        del engine  # its memory and threads; the stack's instances build their own
        model = min(timings.profiles, key=lambda m: timings.profiles[m].weight_bytes)
        measured = serving_overhead.measure(folders, model, timings.profiles[model], threads)
        timings = InstanceTimings(timings.profiles, timings.copy_gbps, measured.overhead)
        meta["serving_measurement"] = measured.to_json()
    data = timings.to_json(**meta)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.json)
    print_profile(timings)
    print(f"wrote {args.json}")


def print_profile(timings) -> None:
    head = ("model", "weights MB", f"step@{PROBE_CONTEXT} ms", f"prefill {PROBE_CONTEXT} ms", "switch ms")
    print("".join(f"{h:>24}" for h in head))
    for model, profile in timings.profiles.items():
        cells = (model, f"{profile.weight_bytes / 1e6:.1f}",
                 f"{profile.decode.predict(PROBE_CONTEXT, 1) * 1e3:.2f}",
                 f"{profile.prefill.predict(PROBE_CONTEXT) * 1e3:.2f}",
                 f"{timings.switch_seconds(model) * 1e3:.2f}")
        print("".join(f"{c:>24}" for c in cells))
    print(f"copy bandwidth {timings.copy_gbps:.1f} GB/s")
    serving = timings.serving
    if serving.request_s or serving.step_s or serving.token_s or serving.corun_step_s:
        print(f"serving overhead: first token +{serving.request_s * 1e3:.1f} ms, decode step "
              f"+{serving.step_s * 1e3:.2f} ms +{serving.token_s * 1e3:.2f} ms per sequence, "
              f"+{serving.corun_step_s * 1e3:.2f} ms while a prefill computes")
