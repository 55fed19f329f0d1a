"""The README's client examples work as written: its curl command and its openai snippet, run
against a real stack (proxy, prefill, decode, HTTP gateway) serving SmolLM2 in bfloat16 under the
README's model id, answer the README's question. Only the gateway's port is the test's own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from stack_helpers import SMALL_STACK
from tokenpool.compose.launcher import Stack, StackConfig

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = "smollm2-135m-instruct"
README_GATEWAY = "127.0.0.1:8000"


def readme_block(language: str, needle: str) -> str:
    """The one fenced block of `language` in the README that contains needle."""
    blocks = [b for b in re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S) if needle in b]
    assert len(blocks) == 1, f"one {language} block with {needle!r} in the README expected: {len(blocks)}"
    return blocks[0]


@pytest.fixture(scope="module")
def gateway(smollm2_dir, tmp_path_factory):
    """host:port of a started stack's gateway."""
    settings = {**SMALL_STACK, "dtype": "bfloat16", "kv_mib": 32, "gateway": True, "gateway_port": 0}
    logs = tmp_path_factory.mktemp("readme-logs")
    stack = Stack(StackConfig(models={MODEL: smollm2_dir}, **settings), logs)
    stack.start(progress=lambda line: None)
    try:
        yield urlparse(stack.gateway_url).netloc
    finally:
        codes = stack.stop()
        assert codes and all(code == 0 for _, code in codes), codes


def test_the_readmes_curl_example_answers(gateway):
    command = readme_block("bash", "curl -s http://127.0.0.1:8000/v1/chat/completions")
    assert README_GATEWAY in command and MODEL in command
    out = subprocess.run(["bash", "-c", command.replace(README_GATEWAY, gateway)], capture_output=True,
                         text=True, timeout=240, check=True)
    reply = json.loads(out.stdout)
    assert reply["model"] == MODEL and reply["object"] == "chat.completion"
    assert "Paris" in reply["choices"][0]["message"]["content"], reply


def test_the_readmes_openai_example_answers(gateway):
    code = readme_block("python", "from openai import OpenAI")
    assert README_GATEWAY in code and MODEL in code
    out = subprocess.run([sys.executable, "-c", code.replace(README_GATEWAY, gateway)], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout, out.stdout
