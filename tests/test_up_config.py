"""`tokenpool up` settings: a TOML file, flags over it, and refusals that name the value."""

from __future__ import annotations

import os

import pytest
from tokenpool.cli.main import build_parser
from tokenpool.cli.up_command import stack_config


def config_from(argv):
    return stack_config(build_parser().parse_args(["up", *argv]))


def test_a_config_file_sets_counts_and_models_and_flags_win(tmp_path, tiny_dir):
    path = tmp_path / "stack.toml"
    path.write_text(f'prefill = 2\ndecode = 3\nport = 6000\npolicy = "request"\n[models]\n'
                    f'tiny-llama = "{tiny_dir / "tiny-llama"}"\nq = "{tiny_dir / "tiny-qwen2"}"\n')
    config = config_from(["--config", str(path), "--decode", "4"])
    assert (config.prefill, config.decode, config.port, config.policy) == (2, 4, 6000, "request")
    assert config.models == {"tiny-llama": tiny_dir / "tiny-llama", "q": tiny_dir / "tiny-qwen2"}


@pytest.mark.parametrize("text, needle", [
    ("prefil = 2\n", "unknown keys ['prefil']"),
    ("prefill = \n", "stack.toml"),
    ("models = 3\n", "[models] must be a table"),
    ('prefill = 0\n[models]\nx = "{tiny}"\n', "prefill must be >= 1, got 0"),
    ('policy = "fifo"\n[models]\nx = "{tiny}"\n', "unknown scheduling policy 'fifo'"),
    ('[models]\nx = "/nowhere"\n', "/nowhere"),
])
def test_bad_config_files_are_refused(tmp_path, tiny_dir, text, needle):
    path = tmp_path / "stack.toml"
    path.write_text(text.replace("{tiny}", str(tiny_dir / "tiny-llama")))
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        config_from(["--config", str(path)])
    assert needle in str(info.value)


def test_trace_flag_sets_the_otlp_endpoint_for_every_service(tiny_dir):
    model = f"--model=tiny-llama={tiny_dir / 'tiny-llama'}"
    assert config_from([model]).trace_endpoint is None
    assert config_from([model, "--trace"]).trace_endpoint == "http://127.0.0.1:4317"
    assert config_from([model, "--trace", "http://jaeger:4317"]).trace_endpoint == "http://jaeger:4317"
    with pytest.raises(ValueError, match="'jaeger:4317'"):
        config_from([model, "--trace", "jaeger:4317"])


def test_launcher_gives_services_the_otel_settings_only_with_a_trace_endpoint(tiny_dir, tmp_path):
    from tokenpool.compose.launcher import Stack

    model = f"--model=tiny-llama={tiny_dir / 'tiny-llama'}"
    traced = Stack(config_from([model, "--trace"]), tmp_path)._env("decode-1")
    assert traced["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://127.0.0.1:4317"
    assert traced["OTEL_SERVICE_NAME"] == "decode-1" and traced["OTEL_TRACES_EXPORTER"] == "otlp"
    plain = Stack(config_from([model]), tmp_path)._env("proxy")  # the environment's own, untouched
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        assert plain.get(name) == os.environ.get(name)
