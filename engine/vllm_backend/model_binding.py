"""A vLLM model module built on the meta device, then pointed at tokenpool's memory.

vLLM's loader would allocate every parameter and copy the checkpoint in; here nothing is
allocated for weights: each parameter becomes a view of a tokenpool tensor (an arena slot).
What vLLM computes at construction and keeps as buffers (RoPE cos/sin tables, KV scales)
is made on the real device once per module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
from vllm.model_executor.models.registry import ModelRegistry

from .weight_names import layer_index, tokenpool_name

# Buffers an attention layer registers for quantised KV; 1.0 (no scaling) in float KV.
_KV_SCALES = ("_k_scale", "_v_scale", "_q_scale", "_prob_scale")


def build_on_meta(config: VllmConfig, dtype: torch.dtype) -> nn.Module:
    """The model class vLLM picks for the folder's architecture, with meta parameters."""
    cls, _ = ModelRegistry.resolve_model_cls(config.model_config.architectures, config.model_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # vLLM's layers take their dtype from the default
    try:
        with set_current_vllm_config(config), torch.device("meta"):
            return cls(vllm_config=config, prefix="")
    finally:
        torch.set_default_dtype(previous)


def materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """RoPE tables recomputed on device (get_rope shares one module between layers and
    models, so a table already real is kept); KV scales set to 1. Any other meta buffer
    is a vLLM change this backend does not know: it raises rather than compute garbage."""
    for module in model.modules():
        if isinstance(module, RotaryEmbeddingBase) and module.cos_sin_cache.is_meta:
            with torch.device(device):
                module.cos_sin_cache = module._compute_cos_sin_cache().to(module.dtype)
    for name, module in model.named_modules():
        for key, buffer in list(module._buffers.items()):
            if buffer is None or not buffer.is_meta:
                continue
            if not isinstance(module, Attention) or key not in _KV_SCALES:
                raise NotImplementedError(f"vLLM buffer {name}.{key} is not materialised by tokenpool")
            module._buffers[key] = torch.ones(buffer.shape, dtype=buffer.dtype, device=device)
    for module in model.modules():
        if isinstance(module, Attention):
            module.process_weights_after_loading(torch.get_default_dtype())


def parameter_names(model: nn.Module, tied: bool) -> list[tuple[str, str]]:
    """(vLLM parameter name, tokenpool tensor name) for every parameter, tied heads included."""
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    if tied and "lm_head.weight" not in names and hasattr(model, "lm_head"):
        names.append("lm_head.weight")  # vLLM may tie by sharing the module
    return [(name, tokenpool_name(name, tied)) for name in names]


def bind_parameters(model: nn.Module, names: list[tuple[str, str]],
                    tensors: Mapping[str, torch.Tensor]) -> None:
    """Point each parameter at its tokenpool tensor (no copy). An embedding whose vocab vLLM
    padded to a multiple of 64 gets the unpadded rows: lookups never reach the padding and
    the logits processor cuts its output back to the real vocab."""
    for vllm_name, ours in names:
        owner, _, attr = vllm_name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(tensors[ours], requires_grad=False))


def set_linear_kernels(model: nn.Module, repack: bool) -> None:
    """How vLLM's CPU linears apply the bound weights.

    repack False: F.linear on the views themselves (a switch stays a copy plus a re-bind).
    repack True: vLLM's own CPU dispatch (oneDNN / sgl packed copies, made from the views
    on every bind; the dense views stay bound for the logits and any later re-bind)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "quant_method") or not isinstance(weight, torch.Tensor):
            continue
        if repack and weight.dim() == 2 and weight.device.type == "cpu":
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        else:
            module.cpu_linear = F.linear


def attention_layers(config: VllmConfig) -> dict[str, Attention]:
    """Every attention layer the built model registered, by its layer name."""
    return {name: layer for name, layer in config.compilation_config.static_forward_context.items()
            if isinstance(layer, Attention)}


def bind_kv_views(layers: Mapping[str, Attention], physical: torch.Tensor, layout: str) -> None:
    """Give each attention layer its slice of the cache, in the shape its backend reads.

    physical, head_major: [layers, blocks, kv_heads, 2, block_size, head_dim] -> per layer
      [blocks, kv_heads, block_size, 2 * head_dim] (the CPU backend views it as
      [blocks, kv_heads, 2 * block_size, head_dim] and splits keys from values on dim 2).
    physical, token_major: [layers, 2, blocks, block_size, kv_heads, head_dim] -> per layer
      [2, blocks, block_size, kv_heads, head_dim] (flash attention's layout on CUDA)."""
    for name, layer in layers.items():
        kv = physical[layer_index(name)]
        if layout == "head_major":
            blocks, heads, _, block_size, head_dim = kv.shape
            kv = kv.view(blocks, heads, block_size, 2 * head_dim)
        layer.kv_cache = kv
