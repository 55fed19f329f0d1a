"""refine_top_logits: the leaders of bf16-rounded logits become exact float32 dot products,
in the CPU kernel and in the torch code the other devices run."""

from __future__ import annotations

import pytest
import torch
from tokenpool.engine import cpu_extension
from tokenpool.engine.logits import refine_top_logits

PATHS = ["kernel", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "kernel" and not cpu_extension.available():
        pytest.skip(f"extension unavailable: {cpu_extension.unavailable_reason()}")
    if request.param == "torch":
        monkeypatch.setattr(cpu_extension, "module", lambda: None)
    return request.param


def near_tie(rows: int, vocab: int, hidden: int, seed: int):
    """bf16 hidden and weight where tokens 7 and 3 differ by less than a bf16 step of their logit."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).bfloat16()
    w = torch.randn(vocab, hidden, generator=gen).bfloat16()
    w[3] = (h.float().sum(0) / rows).bfloat16() * 2  # a clear leader for every row
    w[7] = w[3]
    w[7, 1] += 2 ** -6  # a hair apart: bf16 output rounding puts them level
    return h, w


def test_near_maximum_logits_become_exact_and_the_rest_stay(path):
    h, w = near_tie(5, 1003, 67, seed=3)  # odd sizes: partial vectors in both passes
    exact = h.float() @ w.float().T
    rounded = torch.nn.functional.linear(h, w).float()
    assert not torch.equal(rounded.argmax(-1), exact.argmax(-1))  # the rounding picks wrong somewhere
    refined = refine_top_logits(rounded.clone(), h, w)
    top = rounded.max(-1, keepdim=True).values
    assert torch.equal(refined.argmax(-1), exact.argmax(-1))
    near = rounded >= top - 2.0 ** (torch.floor(torch.log2(top.abs())) - 6)
    torch.testing.assert_close(refined[near], exact[near], rtol=1e-5, atol=1e-5)
    assert torch.equal(refined[~near], rounded[~near])


def test_kernel_and_torch_code_agree(monkeypatch):
    if not cpu_extension.available():
        pytest.skip(f"extension unavailable: {cpu_extension.unavailable_reason()}")
    h, w = near_tie(9, 4096, 576, seed=4)
    rounded = torch.nn.functional.linear(h, w).float()
    kernel = refine_top_logits(rounded.clone(), h, w)
    monkeypatch.setattr(cpu_extension, "module", lambda: None)
    torch.testing.assert_close(refine_top_logits(rounded.clone(), h, w), kernel, rtol=1e-6, atol=1e-6)


def test_the_kernel_refuses_mismatched_shapes():
    if not cpu_extension.available():
        pytest.skip(f"extension unavailable: {cpu_extension.unavailable_reason()}")
    with pytest.raises(RuntimeError, match="weight"):
        cpu_extension.module().refine_logits(torch.zeros(2, 10), torch.zeros(2, 8), torch.zeros(11, 8))
