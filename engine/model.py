"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM2) over a paged KV cache.

Tokens of a step are flattened: hidden states are [num_tokens, hidden_size]
whatever mix of prompts and decodes the step holds. Projections are fused
(q|k|v and gate|up) so a layer makes four matrix calls; the elementwise work
between them (norms, residual adds, RoPE, SwiGLU) runs through cpu_layer_kernels,
one fused call each on the CPU, torch's ops elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackend, AttentionMetadata
from .cpu_layer_kernels import add_rms_norm, rms_norm, rotary, silu_mul
from .kv_cache import PagedKVCache
from .linear import LinearKernel
from .logits import refine_top_logits
from .model_config import ModelConfig, RopeScaling


class Linear(nn.Module):
    """A projection whose weight the kernel prepares once after loading."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)
        self.kernel: LinearKernel | None = None
        self.prepared: torch.Tensor | None = None

    def prepare(self, kernel: LinearKernel, weight: torch.Tensor | None = None) -> None:
        self.kernel = kernel
        self.prepared = kernel.prepare(self.weight if weight is None else weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.apply(x, self.prepared, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """-> rms_norm(x); given residual, first residual += x in place and -> rms_norm(residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


class Rotary:
    """RoPE cos/sin tables for every position, looked up once per step."""

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device | str = "cpu") -> None:
        inv_freq = _inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # [max_positions, head_dim] float32, computed on the CPU: the same tables on any device
        self.cos, self.sin = emb.cos().to(device), emb.sin().to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cos, sin), each [num_tokens, 1, head_dim]."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def _inv_freq(dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if scaling is None:
        return inv_freq
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        qkv_out = config.q_size + 2 * config.kv_size
        self.qkv = Linear(config.hidden_size, qkv_out, config.qkv_bias, dtype)
        self.o = Linear(config.q_size, config.hidden_size, False, dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)

    def forward(self, x, cos, sin, cache, meta: AttentionMetadata, backend: AttentionBackend):
        c = self.config
        q, k, v = self.qkv(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(-1, c.num_heads, c.head_dim)
        k = k.view(-1, c.num_kv_heads, c.head_dim)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, cos, sin)  # may rotate the qkv output in place
        out = backend.forward(q, k, v, cache, meta)
        return self.o(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up = Linear(config.hidden_size, 2 * config.intermediate_size, False, dtype)
        self.down = Linear(config.intermediate_size, config.hidden_size, False, dtype)

    def forward(self, x):
        return self.down(silu_mul(self.gate_up(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, dtype)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype)

    def forward(self, x, residual, cos, sin, cache, meta, backend):
        """Pre-norm residual block, each add fused into the norm after it.

        x: [num_tokens, hidden_size], the embeddings (residual None) or the previous layer's MLP
        output, not yet added. residual: the running sum, float32, updated in place.
        -> (this layer's MLP output, residual); the caller adds the last output in its final norm.
        """
        if residual is None:
            residual, x = x.float(), self.input_norm(x)
        else:
            x = self.input_norm(x, residual)
        x = self.attn(x, cos, sin, cache, meta, backend)
        return self.mlp(self.post_norm(x, residual)), residual


class CausalLM(nn.Module):
    """The whole decoder. forward() -> final hidden states; logits() -> scores.

    The residual stream (the running sum every layer adds its attention and MLP output to)
    is float32 whatever the compute dtype: in bf16, rounding that sum after each of the
    2 x num_layers adds is the error that builds up across layers (the reference's bf16 run
    rounds there; on SmolLM2 it flipped the chat template's first answer token). Norms read
    it in float32 and hand the matrices bf16, so the matrix work is unchanged.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, dtype=dtype),
                                  requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        self.max_positions = max_positions
        self.rotary: Rotary | None = None  # built after the meta-device phase

    def prepare(self, kernel: LinearKernel, device: torch.device | str | None = None) -> None:
        """After weights are loaded: RoPE tables (on device, else where the weights are), and
        every projection packed for kernel."""
        self.rotary = Rotary(self.config, self.max_positions, device or self.embed.device)
        self.prepare_linears(kernel)

    def prepare_linears(self, kernel: LinearKernel) -> None:
        """Point every projection's kernel at the currently bound weights."""
        for module in self.modules():
            if isinstance(module, Linear) and module is not self.lm_head:
                module.prepare(kernel)
        tied = self.embed if self.config.tie_word_embeddings else None
        self.lm_head.prepare(kernel, tied)
        # Packed kernels own their copy: drop the dense one, unless logits() reads it.
        keep = self.lm_head if self._refines_logits and not self.config.tie_word_embeddings else None
        for module in self.modules():
            if isinstance(module, Linear) and module.prepared is not module.weight and module is not keep:
                module.weight = None

    @property
    def _refines_logits(self) -> bool:
        """A narrow compute dtype rounds the logits: logits() re-does the leaders from the
        dense head weight (see logits.py), so that one stays beside any packed copy."""
        return self.dtype != torch.float32

    def _head_weight(self) -> torch.Tensor:
        """lm_head's dense [vocab, hidden] weight (the embedding when they are tied)."""
        return self.embed if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: PagedKVCache,
                meta: AttentionMetadata, backend: AttentionBackend,
                on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden: [num_tokens, hidden_size].

        on_layer(i) runs after layer i has written its KV (streaming it out overlaps the layers after).
        """
        # .to: a no-op unless the embedding is held narrower than the model computes (a bf16 slot)
        x, residual = F.embedding(input_ids, self.embed).to(self.dtype), None
        cos, sin = self.rotary.lookup(positions, self.dtype)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, kv_cache.layer(i), meta, backend)
            if on_layer is not None:
                on_layer(i)
        return self.norm(x, residual)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden_size] -> [n, vocab_size] float32; in a narrow compute dtype,
        each row's leaders are exact float32 dot products (refine_top_logits)."""
        logits = self.lm_head(hidden).float()
        if self._refines_logits:
            logits = refine_top_logits(logits, hidden, self._head_weight())
        return logits
