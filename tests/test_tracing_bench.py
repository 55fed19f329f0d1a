"""`tokenpool bench tracing`: a short off/on pair against real stacks."""

from __future__ import annotations

import json
import os

from tokenpool.cli.main import main


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert main(["bench", "tracing", "--json", str(tmp_path / "t.json"), "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_one_round_measures_both_modes_and_only_the_traced_stack_exports(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")  # the bench must strip it for "off"
    out = tmp_path / "tracing.json"
    models = [f"--model={m}={tiny_dir / m}" for m in ("tiny-llama", "tiny-qwen2")]
    assert main(["bench", "tracing", "--json", str(out), "--rounds", "1", "--requests", "16",
                 "--max-tokens", "8", *models]) == 0
    report = json.loads(out.read_text())
    runs = {r["tracing"]: r for r in report["runs"]}
    assert runs["off"]["spans"] == 0 and runs["on"]["spans"] > 16  # several spans per request
    assert runs["off"]["tokens"] == runs["on"]["tokens"] == 16 * 8
    assert report["overhead"] == 1 - report["on_tokens_per_s"] / report["off_tokens_per_s"]
    services = set(report["spans_by_service"])
    assert {"proxy", "prefill-0", "decode-0"} <= services
    assert any(s.startswith("kvtransfer") for s in services)
    assert [k for k in os.environ if k.startswith("OTEL_")] == ["OTEL_TRACES_EXPORTER"]  # restored
