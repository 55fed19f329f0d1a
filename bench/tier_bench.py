"""`tokenpool bench tiers`: how long the first token takes when the model is resident in an
arena slot, only in the node's host cache, or only on disk (page cache warm, and dropped
where the kernel lets go of it), against a fresh process that starts, loads the model and
computes that token (the naive scale-up, also with the page cache warm and dropped).

One instance in this process serves the model under three ids of the catalogue (lazily
registered, as `tokenpool up --catalogue` does), so two of them can push the measured one
out of the arena's two slots, and its host-cache copy can be evicted, without another model
on disk. The disk rows also give the cold-load bandwidth (model bytes over the time the
ColdLoader takes to read them into the host cache) beside a plain sequential read of the
same files (what `dd bs=8M` reaches), each after the same page-cache drop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.engine.host_model_cache import HostModelCache
from tokenpool.engine.llm_engine import EngineConfig
from tokenpool.engine.model_catalogue import ModelCatalogue
from tokenpool.engine.model_tiers import Tier
from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine, slot_bytes_for
from tokenpool.engine.private_shm import private_dir, shm_root
from tokenpool.engine.sampling_params import SamplingParams

from . import page_cache
from .switch_bench import naive_start

MEASURED, FILLERS = "tier-measured", ("tier-filler-1", "tier-filler-2")
PROMPT = [1, 2, 3, 4]  # the naive child's prompt too
# tier row -> (where the model is before the request, whether its files leave the page cache)
ROWS = {"resident": (Tier.RESIDENT, False), "host cache": (Tier.HOST, False),
        "disk, page cache warm": (Tier.DISK, False), "disk, page cache dropped": (Tier.DISK, True)}


def add_parser(commands) -> None:
    p = commands.add_parser("tiers", help="first-token latency per model tier (slot, host cache, disk)")
    p.add_argument("--model", default=None, help="folder or store name (default: SmolLM2)")
    p.add_argument("--dtype", default="auto", help="weights: auto, float32, bfloat16")
    p.add_argument("--repeats", type=int, default=3, help="samples per row (the median is reported)")
    p.add_argument("--json", type=Path, required=True)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from tokenpool.cli.models_command import ensure_model
    from tokenpool.engine.model_store import DEFAULT_MODEL

    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    folder = ensure_model(args.model or DEFAULT_MODEL)
    config = EngineConfig(dtype=args.dtype)
    files = page_cache.model_files(folder)
    with tempfile.TemporaryDirectory(dir=private_dir(shm_root())) as tmp:
        report = measure(folder, files, config, Path(tmp), args.repeats)
    report.update(model=folder.name, dtype=args.dtype, threads=torch.get_num_threads(),
                  command=" ".join(sys.argv))
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


def measure(folder: Path, files: list[Path], config: EngineConfig, tmp: Path, repeats: int) -> dict:
    slot = slot_bytes_for([folder], config)
    pool = HostKVPool(64 << 20, shm_dir=tmp)
    engine = MultiModelEngine(InstanceConfig(kv_bytes=64 << 20, slot_bytes=slot, engine=config),
                              HostModelCache(tmp / "cache", capacity_bytes=4 * slot, progress=False), pool)
    try:
        catalogue = ModelCatalogue(engine)
        for model_id in (MEASURED, *FILLERS):
            catalogue.add(model_id, folder)
        _first_token(engine, MEASURED)  # warm-up: the kernels, the allocator, the first loads
        rows = {name: [] for name in ROWS}
        drops, loads = [], {"warm": [], "dropped": []}
        for i in range(repeats):
            for name, (tier, drop) in ROWS.items():
                print(f"  repeat {i + 1}/{repeats}: {name}", file=sys.stderr, flush=True)
                if tier is Tier.DISK:
                    loads["dropped" if drop else "warm"].append(_load_seconds(engine, catalogue, files, drop))
                left = _place(engine, catalogue, tier, files, drop)
                if left is not None:
                    drops.append(left)
                rows[name].append(_first_token(engine, MEASURED))
        nbytes = engine.models[MEASURED].profile.nbytes
    finally:
        engine.close()
        pool.close()
    naive = {"warm": [], "dropped": []}
    for i in range(repeats):
        for state in naive:
            print(f"  repeat {i + 1}/{repeats}: fresh process, page cache {state}", file=sys.stderr,
                  flush=True)
            _page_cache(files, drop=state == "dropped")
            naive[state].append(naive_start(folder, config.dtype, "cpu")["total_s"])
    return _report(rows, naive, loads, drops, nbytes, files)


def _place(engine: MultiModelEngine, catalogue: ModelCatalogue, tier: Tier, files: list[Path],
           drop: bool) -> float | None:
    """Put the measured model on `tier`; for a drop, -> the fraction of its files still cached."""
    engine.switch_to(MEASURED)  # in the host cache and a slot
    if tier is Tier.RESIDENT:
        return None
    for filler in FILLERS:  # both slots now hold fillers
        engine.switch_to(filler)
    if tier is Tier.DISK:
        catalogue.evict(MEASURED)
        _page_cache(files, drop)
    if catalogue.entry(MEASURED).tier is not tier:
        raise RuntimeError(f"{MEASURED} is on tier {catalogue.entry(MEASURED).tier}, expected {tier}")
    return page_cache.resident_fraction(files) if drop else None


def _page_cache(files: list[Path], drop: bool) -> None:
    """Drop the files from the page cache, or read them all into it."""
    if drop:
        page_cache.drop(files)
    else:
        page_cache.sequential_read_gbps(files)


def _load_seconds(engine, catalogue, files, drop: bool) -> float:
    """Seconds the ColdLoader takes to read the model from disk into the host cache."""
    _place(engine, catalogue, Tier.DISK, files, drop)
    start = time.perf_counter()
    engine.model_tiers().ensure_cached(MEASURED)
    return time.perf_counter() - start


def _first_token(engine: MultiModelEngine, model_id: str) -> float:
    """Seconds from the request's arrival to its first token, the switch (and any load) included."""
    start = time.perf_counter()
    seq = engine.add_request(model_id, PROMPT, SamplingParams(max_tokens=1, ignore_eos=True))
    engine.switch_to(model_id)
    while not any(out.request_id == seq.request_id for out in engine.step(model_id)):
        pass
    return time.perf_counter() - start


def _report(rows, naive, loads, drops, nbytes: int, files: list[Path]) -> dict:
    file_bytes = sum(f.stat().st_size for f in files)
    page_cache.drop(files)
    cold_read = page_cache.sequential_read_gbps(files)
    warm_read = page_cache.sequential_read_gbps(files)
    median = statistics.median
    return {
        "weight_bytes": nbytes, "file_bytes": file_bytes,
        "first_token_s": {name: median(v) for name, v in rows.items()},
        "first_token_samples_s": rows,
        "naive_s": {state: median(v) for state, v in naive.items()},
        "naive_samples_s": naive,
        "page_cache_left_after_drop": max(drops, default=None),
        "cold_load_gbps": {state: nbytes / median(v) / 1e9 for state, v in loads.items()},
        "sequential_read_gbps": {"warm": warm_read, "dropped": cold_read},
    }


def print_table(report: dict) -> None:
    resident = report["first_token_s"]["resident"]
    naive = report["naive_s"]
    print(f"\n{report['model']} ({report['weight_bytes'] / 2**20:.0f} MiB of weights), "
          f"dtype {report['dtype']}, "
          f"{report['threads']} threads; median first-token latency over the repeats")
    print(f"{'tier':<28}{'first token ms':>16}{'vs resident':>13}{'naive ms':>11}{'naive / tier':>14}")
    for name, seconds in report["first_token_s"].items():
        state = "dropped" if "dropped" in name else "warm"
        print(f"{name:<28}{seconds * 1e3:>16.1f}{seconds / resident:>12.1f}x{naive[state] * 1e3:>11.0f}"
              f"{naive[state] / seconds:>13.1f}x")
    left = report["page_cache_left_after_drop"]
    if left is not None:
        print(f"page cache left after each drop: at most {left:.0%} of the files' pages")
    for state in ("warm", "dropped"):
        print(f"disk -> host cache, page cache {state}: {report['cold_load_gbps'][state]:.2f} GB/s "
              f"(sequential read of the same files: {report['sequential_read_gbps'][state]:.2f} GB/s)")
