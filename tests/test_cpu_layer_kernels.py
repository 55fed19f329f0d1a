"""The fused decoder-layer kernels (cpu_layer_kernels) against the torch code they replace:
float32 and bf16, odd sizes (partial vectors), strided views, the threaded path; and the
fallbacks, which must be that torch code exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenpool.engine import cpu_extension, cpu_layer_kernels
from tokenpool.engine.cpu_layer_kernels import add_rms_norm, available, rms_norm, rotary, silu_mul

needs_kernels = pytest.mark.skipif(
    not available(), reason=f"extension unavailable: {cpu_layer_kernels.unavailable_reason()}")

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 5, 300]  # 300 rows splits across threads
EPS = 1e-5


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a view whose rows are further apart than their width."""
    wide = torch.zeros(x.shape[0], x.shape[1] + 11, dtype=x.dtype)
    wide[:, 3:3 + x.shape[1]] = x
    return wide[:, 3:3 + x.shape[1]]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: within 1e-6 relative; bf16: within one ulp (2^-7 relative)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = (1e-6, 1e-6) if actual.dtype == torch.float32 else (2 ** -7, 1e-5)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm in float32."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", [7, 37, 576])
def test_rms_norm(dtype, rows, hidden):
    x, weight = randn(rows, hidden, dtype=dtype, seed=1), randn(hidden, dtype=dtype, seed=2)
    expected = F.rms_norm(x, weight.shape, weight, EPS)
    assert_matches(rms_norm(x, weight, EPS), expected)
    assert_matches(rms_norm(strided(x), weight, EPS), expected)
    assert_matches(rms_norm(x.view(rows, 1, hidden), weight, EPS), expected.view(rows, 1, hidden))
    if dtype == torch.float32:
        assert_matches(rms_norm(x, weight, EPS), hf_rms_norm(x, weight))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_heads_in_a_fused_projection(dtype):
    """Qwen3's q_norm: rows are head_dim slices of a wider qkv row."""
    qkv = randn(3, 4 * 16 + 40, dtype=dtype, seed=3)
    q, weight = qkv[:, :64].view(3, 4, 16), randn(16, dtype=dtype, seed=4)
    assert_matches(rms_norm(q, weight, EPS), F.rms_norm(q, weight.shape, weight, EPS))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", [37, 576])
def test_add_rms_norm(dtype, rows, hidden):
    x, weight = randn(rows, hidden, dtype=dtype, seed=5), randn(hidden, dtype=dtype, seed=6)
    residual = randn(rows, hidden, dtype=dtype, seed=7)
    expected_residual = residual + x  # the model's add before this kernel, rounded alike
    expected = F.rms_norm(expected_residual, weight.shape, weight, EPS)
    out = add_rms_norm(strided(x), residual, weight, EPS)
    assert torch.equal(residual, expected_residual)
    assert_matches(out, expected)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "fallback"])
@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm_into_a_float32_residual(kernels, rows, monkeypatch):
    """The model's residual stream: bf16 x added into a float32 residual exactly, the norm
    rounded once to bf16."""
    if kernels and not available():
        pytest.skip(f"extension unavailable: {cpu_layer_kernels.unavailable_reason()}")
    if not kernels:
        monkeypatch.setattr(cpu_extension, "module", lambda: None)
    x, weight = randn(rows, 576, dtype=torch.bfloat16, seed=5), randn(576, dtype=torch.bfloat16, seed=6)
    residual = randn(rows, 576, dtype=torch.float32, seed=7)
    expected_residual = residual + x.float()
    expected = F.rms_norm(expected_residual, weight.shape, weight.float(), EPS).bfloat16()
    out = add_rms_norm(strided(x) if kernels else x, residual, weight, EPS)
    assert residual.dtype == torch.float32 and torch.equal(residual, expected_residual)
    assert_matches(out, expected)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 1, 18), (2, 2, 128)])
def test_rotary_on_views_of_a_fused_qkv(dtype, rows, heads, kv_heads, head_dim):
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(rows, q_size + 2 * kv_size, dtype=dtype, seed=8)
    before = qkv.clone()
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(rows, heads, head_dim), k.view(rows, kv_heads, head_dim)
    angles = randn(rows, 1, head_dim, dtype=torch.float32, seed=9, scale=3.0)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected_q, expected_k = cpu_layer_kernels._rotate(q, cos, sin), cpu_layer_kernels._rotate(k, cos, sin)
    out_q, out_k = rotary(q, k, cos, sin)
    assert_matches(out_q, expected_q)
    assert_matches(out_k, expected_k)
    assert torch.equal(v, before[:, q_size + kv_size:])  # v, beside k in the same rows, untouched


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("inter", [5, 45, 1536])
def test_silu_mul(dtype, rows, inter):
    gate_up = randn(rows, 2 * inter, dtype=dtype, seed=10, scale=4.0)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, -20.0, 0.0])  # exp's clamps and tails
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert_matches(silu_mul(gate_up), expected)
    assert_matches(silu_mul(strided(gate_up)), expected)


@needs_kernels
def test_kernels_reject_bad_shapes():
    kernels = cpu_extension.module()
    with pytest.raises(RuntimeError, match="weight must be"):
        kernels.rms_norm(torch.ones(2, 8), torch.ones(7), EPS)
    with pytest.raises(RuntimeError, match="cos and sin"):
        kernels.rotary(torch.ones(2, 3, 8), torch.ones(2, 1, 8), torch.ones(3, 8), torch.ones(3, 8))
    with pytest.raises(RuntimeError, match="even"):
        kernels.silu_mul(torch.ones(2, 7))
    with pytest.raises(RuntimeError, match="residual must be"):  # float64 is neither x's dtype nor float32
        kernels.add_rms_norm(torch.ones(2, 8), torch.ones(2, 8, dtype=torch.float64), torch.ones(8), EPS)


def torch_code(op: str, *args):
    """What model.py ran before these kernels."""
    if op == "rms_norm":
        x, weight = args
        return F.rms_norm(x, weight.shape, weight, EPS)
    if op == "rotary":
        q, k, cos, sin = args
        return cpu_layer_kernels._rotate(q, cos, sin), cpu_layer_kernels._rotate(k, cos, sin)
    gate, up = args[0].chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.float32])
def test_fallbacks_are_the_torch_code(dtype, monkeypatch):
    """float64/fp16 always fall back; float32 falls back when the extension is missing."""
    if dtype == torch.float32:
        monkeypatch.setattr(cpu_extension, "module", lambda: None)
    x, weight = randn(3, 20, dtype=dtype, seed=11), randn(20, dtype=dtype, seed=12)
    assert torch.equal(rms_norm(x, weight, EPS), torch_code("rms_norm", x, weight))
    residual = randn(3, 20, dtype=dtype, seed=13)
    expected = torch_code("rms_norm", residual + x, weight)
    assert torch.equal(add_rms_norm(x, residual, weight, EPS), expected)
    q, k = randn(3, 2, 8, dtype=dtype, seed=14), randn(3, 1, 8, dtype=dtype, seed=15)
    cos, sin = randn(3, 1, 8, dtype=dtype, seed=16), randn(3, 1, 8, dtype=dtype, seed=17)
    for got, want in zip(rotary(q, k, cos, sin), torch_code("rotary", q, k, cos, sin), strict=True):
        assert torch.equal(got, want)
    gate_up = randn(3, 10, dtype=dtype, seed=18)
    assert torch.equal(silu_mul(gate_up), torch_code("silu_mul", gate_up))
