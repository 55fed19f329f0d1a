"""`tokenpool bench engine`: prefill and decode throughput of the engine against
transformers' generate (in this process) and vLLM's `LLM` (in its own virtual environment,
through bench/vllm_runner.py; build it with `bash bench/vllm_venv.sh`) on the same model,
dtype, thread count and token-id prompts, in one run. Baselines `instance` and `instance-dense`
run the model as the prefill and decode services do: in a switching instance (MultiModelEngine,
weights copied into an arena slot and applied as they lie), held as it serves (bf16 matrices
where it computes a bf16 model in float32) or as float32 copies under F.linear."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.model_store import DEFAULT_MODEL
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.engine.scheduler import SchedulerConfig


@dataclass(frozen=True)
class Row:
    engine: str  # tokenpool | a baseline (BASELINES)
    phase: str  # prefill | decode
    batch: int
    tokens_per_s: float


@dataclass(frozen=True)
class Workload:
    batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    dtype: str

    def prompts(self, batch: int, vocab: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(batch)
        return torch.randint(100, min(vocab, 30000), (batch, self.prompt_len), generator=gen).tolist()


def add_parser(commands) -> None:
    p = commands.add_parser("engine", help="engine throughput against transformers")
    p.add_argument("--model", default=DEFAULT_MODEL, help="folder or store name")
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "native", "float32"],
                   help="how tokenpool computes a bf16/fp16 model (auto: natively where the CPU can)")
    p.add_argument("--engine", default="native", choices=["native", "vllm"],
                   help="tokenpool's model backend: native, or vllm (vLLM's model code and kernels "
                        "behind tokenpool's engine; run from the vLLM venv)")
    p.add_argument("--against", default="transformers", type=against_engines,
                   help="comma-separated baselines from transformers, vllm (vLLM's own LLM engine), "
                        "tokenpool-float32 (tokenpool computing in float32 from the rounded weights), "
                        "tokenpool-native (the native backend, beside --engine vllm), instance "
                        "(a switching instance, as the services serve the model), instance-dense "
                        "(one holding float32 copies under F.linear); or none")
    p.add_argument("--vllm-python", type=Path, default=default_vllm_python(),
                   help="python of the vLLM venv (env TOKENPOOL_VLLM_PYTHON; default %(default)s)")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile")
    p.set_defaults(run=run)


BASELINES = ("transformers", "vllm", "tokenpool-float32", "tokenpool-native", "instance", "instance-dense")


def against_engines(text: str) -> tuple[str, ...]:
    """'transformers,vllm' -> ('transformers', 'vllm'); 'none' -> ()."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names == ("none",):
        return ()
    bad = [n for n in names if n not in BASELINES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown baseline {', '.join(map(repr, bad)) or repr(text)} "
                                         f"(choose from {', '.join(BASELINES)}, or none)")
    return names


def default_vllm_python() -> Path:
    """$TOKENPOOL_VLLM_PYTHON, else .venv-vllm/bin/python in the repository root."""
    if os.environ.get("TOKENPOOL_VLLM_PYTHON"):
        return Path(os.environ["TOKENPOOL_VLLM_PYTHON"])
    return Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


def run(args: argparse.Namespace) -> None:
    from tokenpool.cli.models_command import ensure_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompt_len < 1 or args.new_tokens < 2:
        raise ValueError("--prompt-len must be >= 1 and --new-tokens >= 2")
    batches = tuple(int(b) for b in args.batches.split(","))
    if any(b < 1 for b in batches):
        raise ValueError(f"--batches must be positive integers, got {args.batches!r}")
    if "vllm" in args.against:  # fail before minutes of the other engines, not after
        from tokenpool.bench.vllm_runner import check_python

        check_python(args.vllm_python)
    folder = ensure_model(args.model)
    work = Workload(batches, args.prompt_len, args.new_tokens, args.dtype)
    engine, rows = bench_tokenpool(folder, work, args.compute_dtype, backend=args.engine)
    report = {"model": folder.name, "engine": args.engine, "dtype": args.dtype,
              "threads": torch.get_num_threads(),
              "compute_dtype": str(engine.compute_dtype).removeprefix("torch."),
              "linear_kernel": engine.linear_kernel, "prompt_len": work.prompt_len,
              "new_tokens": work.new_tokens}
    if "tokenpool-float32" in args.against:
        rows += bench_tokenpool(folder, work, "float32", "tokenpool-float32", args.engine)[1]
    if "tokenpool-native" in args.against:
        rows += bench_tokenpool(folder, work, args.compute_dtype, "tokenpool-native")[1]
    for name in ("instance", "instance-dense"):
        if name in args.against:
            rows += bench_instance(folder, work, args, name)
    if "transformers" in args.against:
        rows += bench_transformers(folder, work)
    if "vllm" in args.against:
        vllm_rows, report["vllm"] = bench_vllm(folder, work, engine.model_config.vocab_size, args)
        rows += vllm_rows
    report["rows"] = [asdict(r) for r in rows]
    report["ratios"] = ratios(rows)
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_tokenpool(folder: Path, work: Workload, compute: str = "auto", name: str = "tokenpool",
                    backend: str = "native") -> tuple[LLMEngine, list[Row]]:
    most = max(work.batches)
    tokens = most * (work.prompt_len + work.new_tokens + 16)
    scheduler = SchedulerConfig(max_num_seqs=most, max_num_batched_tokens=most * work.prompt_len)
    config = EngineConfig(dtype=work.dtype, compute_dtype=compute, kv_cache_bytes=1, scheduler=scheduler,
                          engine=backend)
    engine = LLMEngine(folder, _with_kv_tokens(config, folder, tokens))
    _log(f"{name}: {engine.describe()}")
    return engine, _timed_rows(engine, work, name)


def _timed_rows(engine, work: Workload, name: str) -> list[Row]:
    """A warm-up, then prefill and decode tokens/s of each batch (see _tokenpool_once)."""
    _tokenpool_once(engine, Workload((2,), 8, 4, work.dtype), 2)
    rows = []
    for batch in work.batches:
        prefill_s, decode_s = _tokenpool_once(engine, work, batch)
        rows += [Row(name, "prefill", batch, batch * work.prompt_len / prefill_s),
                 Row(name, "decode", batch, batch * (work.new_tokens - 1) / decode_s)]
        _log(f"  {name} batch {batch}: prefill {rows[-2].tokens_per_s:.0f} tok/s, "
             f"decode {rows[-1].tokens_per_s:.1f} tok/s")
    return rows


class _OneModelInstance:
    """A switching instance serving one model, with the surface of LLMEngine _tokenpool_once uses."""

    def __init__(self, instance, model_id: str) -> None:
        self.instance, self.model_id = instance, model_id
        self.model_config = instance.models[model_id].profile.config

    def add_request(self, prompt, sampling) -> None:
        self.instance.add_request(self.model_id, prompt, sampling)

    def step(self) -> None:
        self.instance.step(self.model_id)

    @property
    def has_unfinished(self) -> bool:
        return self.instance.has_unfinished(self.model_id)


def bench_instance(folder: Path, work: Workload, args: argparse.Namespace, name: str) -> list[Row]:
    """The model in a MultiModelEngine, as the services run it; instance-dense holds float32
    copies applied by F.linear (what every switching instance did before bf16 slots)."""
    import tempfile
    from dataclasses import replace

    from tokenpool.engine.host_kv_pool import HostKVPool
    from tokenpool.engine.host_model_cache import HostModelCache
    from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine, slot_bytes_for
    from tokenpool.engine.private_shm import private_dir, shm_root

    most = max(work.batches)
    scheduler = SchedulerConfig(max_num_seqs=most, max_num_batched_tokens=most * work.prompt_len)
    config = _with_kv_tokens(EngineConfig(dtype=work.dtype, compute_dtype=args.compute_dtype,
                                          scheduler=scheduler, engine=args.engine,
                                          linear_kernel="dense" if name == "instance-dense" else "auto"),
                             folder, most * (work.prompt_len + work.new_tokens + 16))
    with tempfile.TemporaryDirectory(dir=private_dir(shm_root())) as tmp:
        cache = HostModelCache(Path(tmp) / "cache", capacity_bytes=64 << 30, progress=False)
        pool = HostKVPool(64 << 20, shm_dir=Path(tmp))
        instance = MultiModelEngine(InstanceConfig(config.kv_cache_bytes, slot_bytes_for([folder], config),
                                                   replace(config, kv_cache_bytes=1)), cache, pool)
        try:
            profile = instance.register("m", folder)
            instance.switch_to("m")
            _log(f"{name}: matrices held in {str(profile.dtype).removeprefix('torch.')}, "
                 f"{instance.runner.describe()}")
            return _timed_rows(_OneModelInstance(instance, "m"), work, name)
        finally:
            instance.close()
            pool.close()


def _with_kv_tokens(config: EngineConfig, folder: Path, tokens: int) -> EngineConfig:
    """config with a KV cache sized for exactly `tokens` positions."""
    from dataclasses import replace

    from tokenpool.engine.kv_cache import PagedKVCache
    from tokenpool.engine.llm_engine import resolve_dtypes
    from tokenpool.engine.model_config import ModelConfig

    model_config = ModelConfig.from_folder(folder)
    _, compute = resolve_dtypes(config, model_config)
    per_block = PagedKVCache.bytes_per_block(model_config, config.block_size, compute)
    return replace(config, kv_cache_bytes=per_block * -(-tokens // config.block_size))


def _tokenpool_once(engine: LLMEngine, work: Workload, batch: int) -> tuple[float, float]:
    """-> (seconds for the prefill step, seconds for the remaining decode steps)."""
    sampling = SamplingParams(max_tokens=work.new_tokens, ignore_eos=True)
    for prompt in work.prompts(batch, engine.model_config.vocab_size):
        engine.add_request(prompt, sampling)
    start = time.perf_counter()
    engine.step()  # every prompt fits the step's token budget
    first = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    return first - start, time.perf_counter() - first


def bench_transformers(folder: Path, work: Workload) -> list[Row]:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, work.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    _log(f"transformers: {type(model).__name__}, {work.dtype}, attention "
         f"{model.config._attn_implementation}")
    _generate(model, torch.ones(2, 8, dtype=torch.long), 4)  # warm-up
    rows = []
    for batch in work.batches:
        ids = torch.tensor(work.prompts(batch, model.config.vocab_size))
        prefill_s, decode_s = _generate(model, ids, work.new_tokens)
        rows += [Row("transformers", "prefill", batch, batch * work.prompt_len / prefill_s),
                 Row("transformers", "decode", batch, batch * (work.new_tokens - 1) / decode_s)]
        _log(f"  transformers batch {batch}: prefill {rows[-2].tokens_per_s:.0f} tok/s, "
             f"decode {rows[-1].tokens_per_s:.1f} tok/s")
    return rows


@torch.inference_mode()
def _generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """-> (seconds to the first token's logits, seconds for the remaining tokens), timed
    at each step's logits processing, as the engine's steps are timed."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    clock = StepClock()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([clock]))
    return clock.times[0] - start, clock.times[-1] - clock.times[0]


def bench_vllm(folder: Path, work: Workload, vocab: int, args: argparse.Namespace) -> tuple[list[Row], dict]:
    """vLLM's rows and what its run was (version, start-up), from bench/vllm_runner.py run
    in the vLLM venv on the same token-id prompts."""
    from tokenpool.bench.vllm_runner import VllmJob, launch

    job = VllmJob(model=str(folder), dtype=work.dtype, threads=torch.get_num_threads(),
                  new_tokens=work.new_tokens, batches=[work.prompts(b, vocab) for b in work.batches],
                  enforce_eager=args.vllm_eager)
    _log(f"vllm: running bench/vllm_runner.py with {args.vllm_python} (start-up takes minutes)")
    report = launch(args.vllm_python, job)
    _log(f"vllm {report.vllm_version}: import {report.import_s:.1f} s, start-up {report.startup_s:.1f} s")
    info = {"python": str(args.vllm_python), "version": report.vllm_version, "torch": report.torch_version,
            "import_s": report.import_s, "startup_s": report.startup_s,
            "compiled": not job.enforce_eager, "env": report.env}
    return vllm_rows(work, report), info


def vllm_rows(work: Workload, report) -> list[Row]:
    """Rows from a VllmReport, with the tokenpool side's formulas."""
    rows = []
    for t in report.timings:
        if t.generated_tokens != t.batch * work.new_tokens:
            raise RuntimeError(f"vLLM generated {t.generated_tokens} tokens at batch {t.batch}, "
                               f"expected {t.batch * work.new_tokens}")
        rows += [Row("vllm", "prefill", t.batch, t.prompt_tokens / t.prefill_s),
                 Row("vllm", "decode", t.batch, t.batch * (work.new_tokens - 1) / t.decode_s)]
        _log(f"  vllm batch {t.batch}: prefill {rows[-2].tokens_per_s:.0f} tok/s, "
             f"decode {rows[-1].tokens_per_s:.1f} tok/s")
    return rows


def ratios(rows: list[Row]) -> list[dict]:
    """tokenpool's tokens/s over each baseline's, per phase and batch."""
    ours = {(r.phase, r.batch): r.tokens_per_s for r in rows if r.engine == "tokenpool"}
    return [{"phase": r.phase, "batch": r.batch, "against": r.engine,
             "tokenpool_over": ours[(r.phase, r.batch)] / r.tokens_per_s}
            for r in rows if r.engine != "tokenpool" and (r.phase, r.batch) in ours]


def print_table(report: dict) -> None:
    """One line per phase and batch: each engine's tokens/s, then tokenpool over each baseline."""
    speed = {(r["engine"], r["phase"], r["batch"]): r["tokens_per_s"] for r in report["rows"]}
    engines = list(dict.fromkeys(r["engine"] for r in report["rows"]))
    baselines = [e for e in engines if e != "tokenpool"]
    keys = list(dict.fromkeys((r["phase"], r["batch"]) for r in report["rows"]))
    print(f"\nmodel {report['model']}, dtype {report['dtype']} (tokenpool computes in "
          f"{report['compute_dtype']}, linear {report['linear_kernel']}), "
          f"{report['threads']} threads, prompt {report['prompt_len']}, "
          f"{report['new_tokens']} new tokens")
    if "vllm" in report:
        v = report["vllm"]
        print(f"vllm {v['version']} (torch {v['torch']}, {'compiled' if v['compiled'] else 'eager'}): "
              f"import {v['import_s']:.1f} s, start-up {v['startup_s']:.1f} s")
    width = {e: max(14, len(e) + 2) for e in engines}  # a column per engine, then per ratio
    ratio_width = {e: max(17, len(e) + 5) for e in baselines}
    print(f"{'phase':<9}{'batch':>6}" + "".join(f"{e:>{width[e]}}" for e in engines)
          + "".join(f"{'tp/' + e:>{ratio_width[e]}}" for e in baselines) + "   (tokens/s)")
    for phase, batch in keys:
        cells = [speed.get((e, phase, batch)) for e in engines]
        line = f"{phase:<9}{batch:>6}" + "".join(
            f"{'-' if c is None else f'{c:.1f}':>{width[e]}}" for e, c in zip(engines, cells, strict=True))
        ours = speed.get(("tokenpool", phase, batch))
        for e in baselines:
            ref = speed.get((e, phase, batch))
            w = ratio_width[e]
            line += f"{ours / ref:>{w - 1}.2f}x" if ours and ref else f"{'-':>{w}}"
        print(line)
