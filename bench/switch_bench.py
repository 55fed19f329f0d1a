"""`tokenpool bench switch`: what a model switch costs, per model, each time measured
until the instance is ready to compute with the new model.

(a) naive: a fresh engine process (start, imports, construction, weights from disk,
KV allocation, first step), by phase; (a') a new engine object in this warm process;
(b) tokenpool's switch from the host cache, cold and prefetched; (c) the copy bound,
the model's bytes over memcpy bandwidth measured in this run; (d) KV swap bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.engine.host_model_cache import HostModelCache
from tokenpool.engine.kv_swapper import KVSwapper
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine, slot_bytes_for
from tokenpool.engine.private_shm import private_dir, shm_root
from tokenpool.engine.step_profiler import measure_copy_gbps

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.sampling_params import SamplingParams
t1 = time.perf_counter()
engine = LLMEngine(sys.argv[1], EngineConfig(dtype=sys.argv[2], kv_cache_bytes=64 << 20, device=sys.argv[3],
                                             engine=sys.argv[4]))
t2 = time.perf_counter()
engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=1))  # a token back on the host: the device is done
t3 = time.perf_counter()
phases = {f"{k}_s": v for k, v in engine.startup_seconds.items()}
print(json.dumps({"imports_s": t1 - t0, **phases, "construct_other_s": t2 - t1 - sum(phases.values()),
                  "first_step_s": t3 - t2}))
"""


def add_parser(commands) -> None:
    p = commands.add_parser("switch", help="model switch cost against naive scale-up")
    p.add_argument("--models", nargs="+", default=None,
                   help="folders or store names (default: the tiny models and SmolLM2)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the arena lives; on cuda the host cache and KV pool are page-locked")
    p.add_argument("--engine", default="native", choices=["native", "vllm"],
                   help="the instance's model backend (vllm: run from the vLLM venv)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from tokenpool.cli.models_command import ensure_model
    from tokenpool.engine.model_store import DEFAULT_MODEL
    from tokenpool.engine.tiny_models import make_tiny_models

    config = EngineConfig(dtype=args.dtype, device=args.device, engine=args.engine)  # a bad device fails here
    # The host cache and KV pool in shared memory, as deployed (on CUDA only tmpfs pages can be
    # page-locked for DMA); removed however the run ends.
    with tempfile.TemporaryDirectory(dir=private_dir(shm_root())) as tmp:
        if args.models and len(args.models) < 3:
            raise ValueError("--models needs at least three models (two fill the arena's slots)")
        if args.models:
            folders = [ensure_model(m) for m in args.models]
        else:
            folders = make_tiny_models(Path(tmp) / "tiny") + [ensure_model(DEFAULT_MODEL)]
        rows = [measure(folder, folders, config, Path(tmp)) for folder in folders]
    report = {"engine": args.engine, "dtype": args.dtype, "device": _device_name(args.device),
              "threads": torch.get_num_threads(),
              "cache_dir": str(shm_root()),
              "page_cache": "warm: each checkpoint is read by the host-cache registration "
                            "before the naive start is timed", "rows": rows}
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


def measure(folder: Path, all_folders: list[Path], config: EngineConfig, tmp: Path) -> dict:
    other, third = [f for f in all_folders if f != folder][:2]
    cache = HostModelCache(tmp / f"cache-{folder.name}", capacity_bytes=64 << 30, progress=False)
    pool = HostKVPool(256 << 20, shm_dir=tmp, pin=config.device == "cuda")
    instance = InstanceConfig(kv_bytes=64 << 20, slot_bytes=slot_bytes_for((folder, other, third), config),
                              engine=config)
    engine = MultiModelEngine(instance, cache, pool)
    profile = engine.register(folder.name, folder)
    engine.register("other", other)
    engine.register("third", third)
    naive = naive_start(folder, config.dtype, config.device, config.engine)
    bandwidth = measure_copy_gbps(config.device, max(profile.nbytes, _DRAM_PROBE_BYTES)) * 1e9
    reinit = _timed(lambda: _sync(LLMEngine(folder, dataclasses.replace(config, kv_cache_bytes=64 << 20))))
    cold = min(_switch(engine, folder.name, prefetch=False) for _ in range(3))
    prefetched = min(_switch(engine, folder.name, prefetch=True) for _ in range(3))
    row = {"model": folder.name, "bytes": profile.nbytes, "naive_s": naive["total_s"],
           "naive_phases": naive, "reinit_s": reinit, "switch_s": cold, "prefetched_s": prefetched,
           "copy_bound_s": profile.nbytes / bandwidth, "memcpy_gbps": bandwidth / 1e9}
    if engine.switcher.cuda_copier is not None:  # of the 3 leases: filled by one DMA; the rest staged
        row["page_locked_leases"] = engine.switcher.cuda_copier.pinned_leases
    row.update(_kv_swap(engine, folder.name, pool))
    engine.close()
    pool.close()
    print(f"  {folder.name}: naive {row['naive_s']:.2f} s, switch {cold * 1e3:.1f} ms", file=sys.stderr)
    return row


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def naive_start(folder: Path, dtype: str, device: str, engine: str = "native") -> dict:
    """A fresh process that builds an engine and computes one token: seconds by phase and in all."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), dtype, device, engine], check=True,
                         capture_output=True, text=True)
    total = time.perf_counter() - start
    phases = json.loads(out.stdout.strip().splitlines()[-1])
    phases["process_start_s"] = total - sum(phases.values())
    phases["total_s"] = total
    return phases


def _sync(value):
    """value, once the device has finished the work queued for it (a no-op on the CPU)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return value


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _switch(engine: MultiModelEngine, model_id: str, prefetch: bool) -> float:
    """Seconds until model_id is ready; the two arena slots hold other models before."""
    engine.switch_to("other")
    engine.switch_to("third")
    if prefetch:
        engine.prefetch(model_id).result()
    return _timed(lambda: _sync(engine.switch_to(model_id)))


# memcpy bandwidth is measured with buffers far past the last-level cache, so every model's
# bound uses the same DRAM figure (a 2 MiB probe would measure the cache instead).
_DRAM_PROBE_BYTES = 256 << 20


def _kv_swap(engine: MultiModelEngine, model_id: str, pool: HostKVPool) -> dict:
    engine.switch_to(model_id)
    model = engine.models[model_id]
    kv = engine.runner.kv_cache.kv
    blocks = list(range(min(64, engine.runner.kv_cache.num_blocks)))
    swapper = KVSwapper(pool)
    out = swapper.swap_out(kv, blocks, model.shape)
    offsets = out.result()
    back = swapper.swap_in(kv, offsets, blocks, model.shape)
    back.wait()
    swapper.release(offsets)
    swapper.close()
    return {"kv_swap_out_gbps": out.gbps, "kv_swap_in_gbps": back.gbps}


def print_table(report: dict) -> None:
    for r in report["rows"]:
        phases = ", ".join(f"{k.removesuffix('_s')} {v:.3f}" for k, v in r["naive_phases"].items()
                           if k != "total_s")
        print(f"naive start of {r['model']} (s): {phases}")
    print(f"\n{report.get('device', 'cpu')}, engine {report.get('engine', 'native')}, "
          f"dtype {report['dtype']}, {report['threads']} threads; "
          f"page cache: {report['page_cache']}")
    head = ("model", "MiB", "naive s", "reinit s", "switch ms", "prefetched ms", "bound ms",
            "a/b", "b/c", "pre/b", "a'/b", "KV out GB/s", "KV in GB/s")
    print("".join(f"{h:>14}" for h in head))
    for r in report["rows"]:
        cells = (r["model"][:14], f"{r['bytes'] / 2**20:.1f}", f"{r['naive_s']:.2f}", f"{r['reinit_s']:.3f}",
                 f"{r['switch_s'] * 1e3:.2f}", f"{r['prefetched_s'] * 1e3:.3f}",
                 f"{r['copy_bound_s'] * 1e3:.2f}", f"{r['naive_s'] / r['switch_s']:.0f}x",
                 f"{r['switch_s'] / r['copy_bound_s']:.2f}", f"{r['prefetched_s'] / r['switch_s']:.1%}",
                 f"{r['reinit_s'] / r['switch_s']:.0f}x", f"{r['kv_swap_out_gbps']:.2f}",
                 f"{r['kv_swap_in_gbps']:.2f}")
        print("".join(f"{c:>14}" for c in cells))
