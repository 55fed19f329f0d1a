"""The command line: bad input gets one clear line and exit status 2; the happy paths work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tokenpool.cli.main import main
from tokenpool.engine.llm_engine import EngineConfig


def fails_with(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenpool: error:" in err and needle in err, err
    assert "Traceback" not in err


def test_missing_model_folder(capsys, tmp_path):
    fails_with(capsys, ["generate", "--model", str(tmp_path / "nope"), "hi"], "neither a folder")


def test_folder_without_config(capsys, tmp_path):
    fails_with(capsys, ["generate", "--model", str(tmp_path), "hi"], "no config.json")


def test_malformed_config(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    fails_with(capsys, ["generate", "--model", str(tmp_path), "hi"], "not valid JSON")


def test_config_missing_a_field(capsys, tmp_path, tiny_dir):
    config = json.loads((tiny_dir / "tiny-llama" / "config.json").read_text())
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    fails_with(capsys, ["generate", "--model", str(tmp_path), "hi"], "'hidden_size'")


def test_unsupported_architecture(capsys, tmp_path, tiny_dir):
    config = json.loads((tiny_dir / "tiny-llama" / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    fails_with(capsys, ["generate", "--model", str(tmp_path), "hi"], "unsupported architecture GPT2")


def test_missing_and_truncated_weights(capsys, tmp_path, tiny_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir / "tiny-qwen2", folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    fails_with(capsys, ["generate", "--model", str(folder), "hi"], "do not fit")
    weights.unlink()
    fails_with(capsys, ["generate", "--model", str(folder), "hi"], "no *.safetensors")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_cuda_without_a_cuda_device_is_one_clear_line(capsys, tmp_path, tiny_dir):
    model = f"--model=tiny-llama={tiny_dir / 'tiny-llama'}"
    fails_with(capsys, ["serve", "--device", "cuda", "--port", "0", model], "sees no CUDA device")
    fails_with(capsys, ["bench", "switch", "--device", "cuda", "--json", str(tmp_path / "s.json")],
               "sees no CUDA device")
    assert not (tmp_path / "s.json").exists()
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        EngineConfig(device="tpu")


def test_prompt_longer_than_context(capsys, tiny_dir):
    fails_with(capsys, ["generate", "--model", str(tiny_dir / "tiny-qwen3"), "word " * 2000],
               "context")


@pytest.mark.parametrize("flag, value, field", [
    ("--temperature", "-1", "temperature"), ("--top-p", "2", "top_p"),
    ("--max-tokens", "0", "max_tokens"), ("--top-k", "-4", "top_k")])
def test_sampling_values_out_of_range(capsys, tiny_dir, flag, value, field):
    fails_with(capsys, ["generate", "--model", str(tiny_dir / "tiny-llama"), flag, value, "hi"],
               field)


def test_generate_streams_text(capsys, tiny_dir):
    assert main(["generate", "--model", str(tiny_dir / "tiny-llama"), "--max-tokens", "12",
                 "Hello there"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "12 tokens, finish length" in captured.err


def test_models_list_and_store_names(capsys, tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("TOKENPOOL_MODELS", str(tmp_path))
    assert main(["models", "make-tiny"]) == 0
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"):
        assert name in out
    assert "MiB" in out
    assert main(["generate", "--model", "tiny-qwen2", "--max-tokens", "3", "hi"]) == 0
    fails_with(capsys, ["generate", "--model", "tiny-nothing", "hi"], "tiny-llama")


def test_bench_engine_writes_json(capsys, tmp_path, tiny_dir):
    out = tmp_path / "bench.json"
    assert main(["bench", "engine", "--model", str(tiny_dir / "tiny-qwen3"), "--json", str(out),
                 "--batches", "1,3", "--prompt-len", "8", "--new-tokens", "4",
                 "--dtype", "bfloat16", "--compute-dtype", "native",
                 "--against", "transformers,tokenpool-float32"]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "tiny-qwen3" and report["dtype"] == "bfloat16"
    assert report["compute_dtype"] == "bfloat16" and report["threads"] >= 1
    keys = {(r["engine"], r["phase"], r["batch"]) for r in report["rows"]}
    assert keys == {(e, p, b) for e in ("tokenpool", "tokenpool-float32", "transformers")
                    for p in ("prefill", "decode") for b in (1, 3)}
    assert {(r["against"], r["batch"]) for r in report["ratios"] if r["phase"] == "decode"} == {
        (e, b) for e in ("tokenpool-float32", "transformers") for b in (1, 3)}
    assert all(r["tokens_per_s"] > 0 for r in report["rows"])
    assert "tp/tokenpool-float32" in capsys.readouterr().out


def test_bench_switch_writes_json(capsys, tmp_path, tiny_dir):
    out = tmp_path / "switch.json"
    models = [str(tiny_dir / n) for n in ("tiny-llama", "tiny-qwen2", "tiny-qwen3")]
    assert main(["bench", "switch", "--models", *models, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    keys = {"model", "bytes", "naive_s", "reinit_s", "switch_s", "prefetched_s", "copy_bound_s",
            "kv_swap_out_gbps", "kv_swap_in_gbps"}
    assert [r["model"] for r in report["rows"]] == ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]
    for row in report["rows"]:
        assert keys <= set(row) and all(row[k] > 0 for k in keys - {"model"})
        assert row["naive_s"] > row["switch_s"]
    assert "prefetched ms" in capsys.readouterr().out
    fails_with(capsys, ["bench", "switch", "--models", models[0], "--json", str(out)], "three models")
