"""What this backend assumes of vLLM's internals, checked against the installed vLLM.

problems() lists every assumption that no longer holds (empty on the pinned version);
tests/test_vllm_backend.py fails loudly on any, naming it, before a parity test would
fail obscurely.
"""

from __future__ import annotations

import dataclasses
import inspect

import vllm
from vllm.config import set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers import linear, vocab_parallel_embedding
from vllm.model_executor.layers.attention import attention
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase
from vllm.model_executor.layers.utils import cpu_unquantized_gemm, dispatch_cpu_unquantized_gemm
from vllm.model_executor.models.registry import ModelRegistry
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.kv_cache_interface import KVCacheLayout

from . import PINNED_VERSION

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
CPU_HEAD_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _source_has(fn, *needles: str) -> bool:
    text = inspect.getsource(fn)
    return all(n in text for n in needles)


def problems() -> list[str]:
    """Each broken assumption, as a sentence naming the vLLM object."""
    checks = {
        f"vllm.__version__ is {vllm.__version__}, pinned {PINNED_VERSION}":
            vllm.__version__ == PINNED_VERSION,
        "EngineArgs lacks model/dtype/enforce_eager/block_size/max_model_len/skip_tokenizer_init":
            {"model", "dtype", "enforce_eager", "block_size", "max_model_len", "skip_tokenizer_init"}
            <= {f.name for f in dataclasses.fields(EngineArgs)},
        "set_current_vllm_config no longer takes a VllmConfig first":
            "vllm_config" in _params(set_current_vllm_config),
        "set_forward_context lost attn_metadata/vllm_config/num_tokens/slot_mapping":
            {"attn_metadata", "vllm_config", "num_tokens", "slot_mapping"} <= _params(set_forward_context),
        "CommonAttentionMetadata's required fields changed":
            {f.name for f in dataclasses.fields(CommonAttentionMetadata)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
            == {"query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens",
                "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping"},
        "CPU attention no longer reads head-major blocks (KVCacheLayout.LBHNC)":
            CPUAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,),
        "CPU attention no longer splits keys from values as [blocks, heads, 2 * block_size, D]":
            _source_has(CPUAttentionBackendImpl.do_kv_cache_update, "block_size * 2", "chunk(2, dim=2)"),
        "CPU attention's head sizes changed (torch_paged_attention.py's fallback rule)":
            CPUAttentionBackend.get_supported_head_sizes() == CPU_HEAD_SIZES,
        "Attention layers no longer read layer.kv_cache and the forward context's slot_mapping dict":
            _source_has(attention.get_attention_context, "attn_layer.kv_cache",
                        "forward_context.slot_mapping"),
        "CPU linears no longer apply layer.cpu_linear":
            _source_has(cpu_unquantized_gemm, "layer.cpu_linear"),
        "dispatch_cpu_unquantized_gemm(layer, remove_weight) changed":
            _params(dispatch_cpu_unquantized_gemm) == {"layer", "remove_weight"},
        "UnquantizedLinearMethod.apply no longer goes through the platform gemm":
            _source_has(linear.UnquantizedLinearMethod.apply,
                        "self._gemm_impl(layer, x, layer.weight, bias)"),
        "UnquantizedEmbeddingMethod.apply no longer goes through the platform gemm":
            _source_has(vocab_parallel_embedding.UnquantizedEmbeddingMethod.apply, "layer.weight"),
        "RotaryEmbeddingBase lost _compute_cos_sin_cache / cos_sin_cache":
            hasattr(RotaryEmbeddingBase, "_compute_cos_sin_cache")
            and _source_has(RotaryEmbeddingBase.__init__, "cos_sin_cache"),
    }
    found = [what for what, ok in checks.items() if not ok]
    archs = ModelRegistry.get_supported_archs()
    found += [f"ModelRegistry no longer serves {arch}" for arch in ARCHITECTURES if arch not in archs]
    return found
