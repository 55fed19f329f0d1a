"""VllmBackend: vLLM's model class and attention kernels behind ModelBackend.

    build (once per shape):  VllmConfig from the folder -> model class on the meta device
                             -> RoPE tables and KV scales made real -> attention builders
    bind_weights:            every parameter -> a view of a tokenpool tensor (no copy)
    bind_kv:                 every attention layer -> its slice of tokenpool's paged blocks
    execute:                 StepPlan -> CommonAttentionMetadata -> per-layer metadata
                             -> model(input_ids, positions) in vLLM's forward context
                             -> compute_logits -> tokenpool's Sampler

Nothing here calls vLLM's LLM, engine core, scheduler, KV allocator or weight loader.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from vllm.config import set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from ..kv_cache import PagedKVCache
from ..model_backend import BackendSpec, ModelBackend
from ..model_switcher import model_specs
from ..sampler import Sampler
from ..scheduler import StepPlan, StepResult
from ..weights import Checkpoint, WeightLayout
from . import model_binding, runtime
from .step_inputs import StepInputs, step_inputs
from .torch_paged_attention import TorchPagedAttentionImpl, TorchPagedMetadata

log = logging.getLogger(__name__)


class VllmBackend(ModelBackend):
    name = "vllm"

    @staticmethod
    def layout_for(device: str) -> str:
        """vLLM's CPU attention reads head-major blocks; its CUDA backends read token-major ones."""
        return "head_major" if torch.device(device).type == "cpu" else "token_major"

    def __init__(self, spec: BackendSpec) -> None:
        runtime.check_version()
        self.spec = spec
        self.device = torch.device(spec.device)
        self.layout = self.layout_for(spec.device)
        max_len = min(spec.max_positions, spec.config.max_position_embeddings)
        self.config = runtime.vllm_config(spec.folder, spec.dtype, spec.block_size, max_len)
        runtime.ensure_world_of_one(self.config)
        self.model = model_binding.build_on_meta(self.config, spec.dtype)
        with set_current_vllm_config(self.config):
            model_binding.materialize_buffers(self.model, self.device)
        self.names = model_binding.parameter_names(self.model, spec.config.tie_word_embeddings)
        self.layers = model_binding.attention_layers(self.config)
        self.repack = spec.linear_kernel not in ("dense",)
        self.torch_attention = self._fall_back_where_unsupported()
        self._builder = None if self.torch_attention else self._metadata_builder()
        self._sampler = Sampler()
        self._kv: PagedKVCache | None = None
        self._on_layer: Callable[[int], None] | None = None
        self._hook_layers()

    # -- build --------------------------------------------------------------------

    def _fall_back_where_unsupported(self) -> bool:
        """Attention of a head size vLLM's CPU kernel has no build for runs in torch (see
        torch_paged_attention.py) -> whether it does."""
        head = self.spec.config.head_dim
        if self.device.type != "cpu" or head in CPUAttentionBackend.get_supported_head_sizes():
            return False
        for layer in self.layers.values():
            impl = layer.impl
            layer.impl = TorchPagedAttentionImpl(impl.num_heads, impl.scale, impl.sliding_window)
        log.warning("vLLM's CPU attention has no kernel for head_dim %d; %s attends in torch over "
                    "the same KV layout", head, self.spec.folder.name)
        return True

    def _metadata_builder(self):
        """One builder for all layers: they must share one KV spec (one window, one head size)."""
        specs = {layer.get_kv_cache_spec(self.config) for layer in self.layers.values()}
        if len(specs) != 1:
            raise NotImplementedError(f"{self.spec.folder.name}: layers of {len(specs)} KV shapes "
                                      f"(e.g. mixed sliding windows) are not supported by this backend")
        first = next(iter(self.layers.values()))
        with set_current_vllm_config(self.config):
            return first.attn_backend.get_builder_cls()(specs.pop(), list(self.layers), self.config,
                                                        self.device)

    def _hook_layers(self) -> None:
        """on_layer(i) after decoder layer i: its attention has written the step's KV."""
        for i, layer in enumerate(self.model.model.layers):
            layer.register_forward_hook(self._layer_done(i))

    def _layer_done(self, index: int):
        def hook(module, args, output) -> None:  # returns None: the output stays as it is
            if self._on_layer is not None:
                self._on_layer(index)
        return hook

    # -- binding --------------------------------------------------------------------

    def bind_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        model_binding.bind_parameters(self.model, self.names, tensors)
        model_binding.set_linear_kernels(self.model, self.repack)

    def load(self, folder: Path, round_to: torch.dtype | None) -> None:
        """Tensors in tokenpool's fused layout, owned here, then bound as a slot would be;
        linears take vLLM's own CPU packing unless the spec asks for dense."""
        layout, checkpoint = WeightLayout(self.spec.config), Checkpoint(folder)
        checkpoint.check(layout)
        self._owned = {}
        for spec in model_specs(self.spec.config, self.spec.dtype):
            tensor = self._owned[spec.name] = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
            checkpoint.fill(layout, spec.name, tensor, round_to)
        self.bind_weights(self._owned)

    def bind_kv(self, kv: PagedKVCache) -> None:
        if kv.layout != self.layout:
            raise ValueError(f"vLLM's attention here reads {self.layout} KV, got {kv.layout}")
        if kv is not self._kv:
            model_binding.bind_kv_views(self.layers, kv.physical, self.layout)
            self._kv = kv

    @property
    def kv_cache(self) -> PagedKVCache:
        return self._kv

    @property
    def sampler(self) -> Sampler:
        return self._sampler

    @sampler.setter
    def sampler(self, sampler: Sampler) -> None:
        self._sampler = sampler

    # -- stepping --------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan, on_layer: Callable[[int], None] | None = None) -> StepResult:
        inputs = step_inputs(plan, self.spec.block_size, self.device)
        meta = self._attention_metadata(inputs)
        slots = inputs.common.slot_mapping
        self._on_layer = on_layer
        try:
            with set_forward_context({name: meta for name in self.layers}, self.config,
                                     num_tokens=len(inputs.input_ids),
                                     slot_mapping={name: slots for name in self.layers}):
                hidden = self.model(inputs.input_ids, inputs.positions)
        finally:
            self._on_layer = None
        if not inputs.sample_rows:
            return StepResult({})
        rows = torch.tensor(inputs.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows]).float()
        seqs = inputs.sample_seqs
        tokens = self._sampler.sample(logits, seqs)
        return StepResult({s.request_id: t for s, t in zip(seqs, tokens, strict=True)},
                          self._sampler.logprobs(logits, seqs, tokens))

    def _attention_metadata(self, inputs: StepInputs):
        if self.torch_attention:
            return TorchPagedMetadata(inputs.query_start, inputs.seq_lens, inputs.common.block_table_tensor)
        # vLLM's CPU metadata records omp_get_max_threads() and its kernel checks it. Torch applies its
        # thread count to a thread's OpenMP at that thread's first parallel op (lazily), so on a fresh
        # thread (an instance's engine worker) the forward would change it after this build: asking
        # torch applies it now.
        torch.get_num_threads()
        return self._builder.build(0, inputs.common)

    def describe(self) -> str:
        linear = "vLLM CPU packing (per bind)" if self.repack else "dense views"
        attention = "torch over vLLM's layout" if self.torch_attention else type(
            next(iter(self.layers.values())).impl).__name__
        return f"vllm (model {type(self.model).__name__}, linear {linear}, attention {attention})"
