"""The bf16-weight linear (csrc/bf16_linear.cpp, engine/bf16_linear.py) against torch's float32
linear on the same rounded weights: every row count the kernel has a code path for (1..8, and
the passes beyond), sizes that leave partial vectors and partial output blocks, with and
without bias, strided rows, the threaded split; and the factory's choice of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenpool.engine import cpu_extension
from tokenpool.engine.bf16_linear import MAX_GEMV_ROWS, Bf16GemvLinear, bf16_gemv_supports
from tokenpool.engine.linear import make_linear_kernel, onednn_supports

# The kernels must build wherever the tests run: a missing build is a failure, not a skip.
CPU = torch.device("cpu")


def rounded(*shape: int, seed: int) -> torch.Tensor:
    """float32 values that bf16 holds exactly, as the float32 compute path loads them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(torch.bfloat16).float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, K: int) -> None:
    """Equal up to summation order: float32 rounding grows with K and the values' size."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * K ** 0.5)


def test_the_extension_builds_here():
    assert cpu_extension.available(), cpu_extension.unavailable_reason()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17])
@pytest.mark.parametrize("K,N", [(576, 960), (37, 13), (64, 5), (8, 1), (3, 70), (1536, 257)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_is_float32_linear_on_the_rounded_weights(rows, K, N, bias):
    x, w = torch.randn(rows, K), rounded(N, K, seed=rows + K)
    b = torch.randn(N) if bias else None
    out = cpu_extension.module().bf16_linear(x, w.to(torch.bfloat16), b)
    assert_close(out, F.linear(x, w, b), K)


def test_kernel_reads_strided_rows():
    x, w = torch.randn(5, 100)[:, 10:90], rounded(33, 80, seed=3)
    out = cpu_extension.module().bf16_linear(x, w.to(torch.bfloat16), None)
    assert_close(out, F.linear(x, w), 80)


def test_kernel_rejects_bad_inputs():
    kernels = cpu_extension.module()
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernels.bf16_linear(torch.zeros(2, 7), w, None)
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.bf16_linear(torch.zeros(2, 8, dtype=torch.bfloat16), w, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        kernels.bf16_linear(torch.zeros(2, 8), w, torch.zeros(5))


@pytest.mark.parametrize("shape", [(1, 576), (MAX_GEMV_ROWS, 576), (MAX_GEMV_ROWS + 1, 576),
                                   (40, 576), (2, 3, 576), (0, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_kernel_matches_dense_on_both_sides_of_the_threshold(shape, bias):
    w, b = rounded(300, 576, seed=7), (torch.randn(300) if bias else None)
    kernel = Bf16GemvLinear()
    x = torch.randn(shape)
    out = kernel.apply(x, kernel.prepare(w), b)
    assert_close(out, F.linear(x, w, b), 576)


def test_linear_kernel_refuses_weights_bf16_cannot_hold():
    with pytest.raises(ValueError, match="rounded to bfloat16"):
        Bf16GemvLinear().prepare(torch.randn(4, 8))


def test_auto_picks_it_for_bf16_weights_computed_in_float32_only():
    assert bf16_gemv_supports(CPU, torch.float32, torch.bfloat16)
    assert make_linear_kernel("auto", CPU, torch.float32, torch.bfloat16).name == "bf16_gemv"
    assert make_linear_kernel("auto", CPU, torch.float32).name == "onednn"
    assert make_linear_kernel("auto", torch.device("meta"), torch.float32, torch.bfloat16).name == "dense"
    if onednn_supports(torch.bfloat16):
        assert make_linear_kernel("auto", CPU, torch.bfloat16, torch.bfloat16).name == "onednn"
    for name in ("dense", "onednn"):  # the old names still mean what they did
        assert make_linear_kernel(name, CPU, torch.float32, torch.bfloat16).name == name
    with pytest.raises(ValueError, match="bf16_gemv"):
        make_linear_kernel("bf16_gemv", CPU, torch.float32, torch.float32)
