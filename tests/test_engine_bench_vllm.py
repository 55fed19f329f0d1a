"""`tokenpool bench engine --against vllm` without vLLM: the runner's JSON contract, its
process plumbing (run against a stand-in `vllm` package), the rows, ratios and table."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import msgspec
import pytest
from tokenpool.bench import engine_bench
from tokenpool.bench.engine_bench import Row, Workload, against_engines, print_table, ratios, vllm_rows
from tokenpool.bench.vllm_runner import BatchTiming, VllmJob, VllmReport, decode_report, launch, runner_env

JOB = VllmJob(model="/models/m", dtype="bfloat16", threads=2, new_tokens=4,
              batches=[[[5, 6, 7]], [[1, 2, 3], [4, 5, 6]]])

FAKE_VLLM = textwrap.dedent('''
    import os
    __version__ = "0.0-fake"

    class _Out:
        def __init__(self, n):
            self.outputs = [type("C", (), {"token_ids": [0] * n})()]

    class SamplingParams:
        def __init__(self, max_tokens, temperature, ignore_eos, detokenize):
            assert temperature == 0.0 and ignore_eos and not detokenize
            self.max_tokens = max_tokens

    class LLM:
        def __init__(self, **kw):
            assert not kw["enable_prefix_caching"] and kw["max_num_seqs"] == 2, kw
            assert len(os.environ["VLLM_CPU_OMP_THREADS_BIND"].split(",")) == 1
            print("vLLM chatter on stdout")  # must not reach the report

        def generate(self, prompts, sampling, use_tqdm):
            assert all(set(p) == {"prompt_token_ids"} for p in prompts)
            return [_Out(sampling.max_tokens) for _ in prompts]
''')


def test_against_takes_a_list_of_baselines_or_none():
    assert against_engines("transformers") == ("transformers",)
    assert against_engines("transformers, vllm,vllm") == ("transformers", "vllm")
    assert against_engines("none") == ()
    with pytest.raises(argparse.ArgumentTypeError, match="'sglang'"):
        against_engines("vllm,sglang")


def test_the_parser_defaults_to_transformers_and_the_repositorys_vllm_venv(monkeypatch):
    monkeypatch.delenv("TOKENPOOL_VLLM_PYTHON", raising=False)
    assert engine_bench.default_vllm_python().parts[-3:] == (".venv-vllm", "bin", "python")
    monkeypatch.setenv("TOKENPOOL_VLLM_PYTHON", "/opt/v/bin/python")
    assert str(engine_bench.default_vllm_python()) == "/opt/v/bin/python"


def test_a_job_round_trips_through_json_and_bad_fields_are_named():
    assert msgspec.json.decode(msgspec.json.encode(JOB), type=VllmJob) == JOB
    assert (JOB.max_batch, JOB.max_prompt_len) == (2, 3)
    raw = msgspec.to_builtins(JOB)
    for field, value, words in [("dtype", "int4", "'int4'"), ("new_tokens", 1, "new_tokens"),
                                ("batches", [[]], "batches"), ("schema", 99, "schema 99")]:
        with pytest.raises(msgspec.ValidationError, match=words):
            msgspec.json.decode(msgspec.json.encode({**raw, field: value}), type=VllmJob)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(msgspec.json.encode({**raw, "extra": 1}), type=VllmJob)


def test_the_runner_env_binds_the_threads_and_lets_the_caller_override():
    env = runner_env(JOB, {}, {7, 3, 5})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "3,5" and env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    assert runner_env(JOB, {"VLLM_CPU_KVCACHE_SPACE": "8"}, {0, 1})["VLLM_CPU_KVCACHE_SPACE"] == "8"
    with pytest.raises(ValueError, match="threads 2 but this process may use only 1 cpus"):
        runner_env(JOB, {}, {0})


def test_a_report_that_is_not_json_or_off_schema_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no JSON report"):
        decode_report(b"INFO starting vllm\n")
    with pytest.raises(RuntimeError, match="does not fit the schema"):
        decode_report(b'{"vllm_version": "x"}')


def test_a_missing_venv_names_the_setup_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench/vllm_venv.sh"):
        launch(tmp_path / "nope" / "python", JOB)


def test_the_runner_script_reads_a_job_and_prints_only_its_report(tmp_path, monkeypatch):
    """The real script in a child process, with stand-in vllm and torch packages."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (tmp_path / "torch.py").write_text('__version__ = "0.0-fake"\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    report = launch(sys.executable, msgspec.structs.replace(JOB, threads=1), timeout_s=60)
    assert report.vllm_version == "0.0-fake" and report.startup_s >= 0
    assert [(t.batch, t.prompt_tokens, t.generated_tokens) for t in report.timings] == [(1, 3, 4), (2, 6, 8)]
    assert report.env["VLLM_CPU_OMP_THREADS_BIND"] == str(min(os.sched_getaffinity(0)))


def test_vllm_rows_use_the_tokenpool_sides_formulas():
    work = Workload((1, 8), prompt_len=64, new_tokens=65, dtype="bfloat16")
    report = VllmReport("0.32.0", "2.13.0", 1.0, 100.0, {}, [
        BatchTiming(1, 64, prefill_s=0.5, total_s=2.5, generated_tokens=65),
        BatchTiming(8, 512, prefill_s=1.0, total_s=5.0, generated_tokens=520)])
    rows = vllm_rows(work, report)
    assert [(r.phase, r.batch, r.tokens_per_s) for r in rows] == [
        ("prefill", 1, 128.0), ("decode", 1, 32.0), ("prefill", 8, 512.0), ("decode", 8, 128.0)]
    short = VllmReport("0.32.0", "2.13.0", 1.0, 100.0, {}, [BatchTiming(1, 64, 0.5, 2.5, 3)])
    with pytest.raises(RuntimeError, match="generated 3 tokens at batch 1, expected 65"):
        vllm_rows(work, short)


def test_the_table_has_a_column_per_engine_and_a_ratio_per_baseline(capsys):
    rows = [Row("tokenpool", "decode", 8, 300.0), Row("transformers", "decode", 8, 150.0),
            Row("vllm", "decode", 8, 250.0)]
    report = {"model": "m", "dtype": "bfloat16", "compute_dtype": "bfloat16", "linear_kernel": "onednn",
              "threads": 2, "prompt_len": 64, "new_tokens": 64, "rows": [vars(r) for r in rows],
              "vllm": {"version": "0.32.0", "torch": "2.13.0", "compiled": True, "import_s": 9.0,
                       "startup_s": 103.4}}
    assert ratios(rows) == [
        {"phase": "decode", "batch": 8, "against": "transformers", "tokenpool_over": 2.0},
        {"phase": "decode", "batch": 8, "against": "vllm", "tokenpool_over": 1.2}]
    print_table(report)
    out = capsys.readouterr().out
    assert "start-up 103.4 s" in out
    header, line = out.strip().splitlines()[-2:]
    assert header.split()[:5] == ["phase", "batch", "tokenpool", "transformers", "vllm"]
    assert "tp/vllm" in header
    assert line.split() == ["decode", "8", "300.0", "150.0", "250.0", "2.00x", "1.20x"]

