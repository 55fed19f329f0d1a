"""`tokenpool up` settings: a TOML file, flags over it, and refusals that name the value."""

from __future__ import annotations

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
