"""tokenpool's fused tensor names (model_switcher.model_specs) <-> vLLM's parameter names.

Both fuse the same way, so one cached tensor is one vLLM parameter, bytes unchanged:
    layers.{i}.attn.qkv.weight     [q + 2 kv, hidden]   model.layers.{i}.self_attn.qkv_proj.weight
    layers.{i}.mlp.gate_up.weight  [2 inter, hidden]    model.layers.{i}.mlp.gate_up_proj.weight
A tied lm_head has no tensor of its own: it is bound to `embed`.
"""

from __future__ import annotations

import re

_GLOBAL = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_PER_LAYER = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_norm.weight",
    "self_attn.qkv_proj.weight": "attn.qkv.weight",
    "self_attn.qkv_proj.bias": "attn.qkv.bias",
    "self_attn.o_proj.weight": "attn.o.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_up_proj.weight": "mlp.gate_up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def tokenpool_name(vllm_name: str, tied: bool) -> str:
    """The tokenpool tensor a vLLM parameter is bound to; KeyError names an unknown one
    (a model class this backend does not map yet)."""
    if vllm_name == "lm_head.weight" and tied:
        return "embed"
    if vllm_name in _GLOBAL:
        return _GLOBAL[vllm_name]
    match = _LAYER.fullmatch(vllm_name)
    if match is None or match.group(2) not in _PER_LAYER:
        raise KeyError(f"vLLM parameter {vllm_name!r} has no tokenpool tensor")
    return f"layers.{match.group(1)}.{_PER_LAYER[match.group(2)]}"


def layer_index(attention_layer_name: str) -> int:
    """'model.layers.7.self_attn.attn' -> 7."""
    match = re.search(r"\.layers\.(\d+)\.", attention_layer_name)
    if match is None:
        raise ValueError(f"cannot tell the layer of attention {attention_layer_name!r}")
    return int(match.group(1))
