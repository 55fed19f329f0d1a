"""The built-in real model answers a real question through the CLI (each compute path in the
engine: test_bf16_parity.py)."""

from __future__ import annotations

from tokenpool.cli.main import main

QUESTION = "What is the capital of France?"


def test_generate_command_streams_paris(capsys, smollm2_dir):
    assert main(["generate", "--model", str(smollm2_dir), "--chat", "--max-tokens", "24",
                 QUESTION]) == 0
    assert "Paris" in capsys.readouterr().out
