"""refine_top_logits: the leaders of bf16-rounded logits become exact float32 dot products."""

from __future__ import annotations

import torch
from tokenpool.engine.logits import refine_top_logits


def test_a_tie_made_by_bf16_rounding_is_broken_the_way_float32_breaks_it():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 64, generator=gen).bfloat16()
    weight = torch.randn(500, 64, generator=gen).bfloat16()
    # Token 7 a hair ahead of token 3 in float32: bf16 output rounding puts them level.
    weight[7] = weight[3]
    weight[7, 0] += torch.sign(hidden[:, 0].float().sum()).bfloat16() * 2 ** -5
    exact = hidden.float() @ weight.float().T
    rounded = torch.nn.functional.linear(hidden, weight).float()
    refined = refine_top_logits(rounded.clone(), hidden, weight)
    top = exact.topk(16, dim=-1).indices
    assert torch.allclose(refined.gather(1, top), exact.gather(1, top), rtol=0, atol=1e-4)
    assert torch.equal(refined.argmax(-1), exact.argmax(-1))
    rest = torch.ones_like(rounded, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(refined[rest], rounded[rest])  # the tail keeps the matmul's values


def test_fewer_tokens_than_candidates():
    hidden, weight = torch.randn(2, 8).bfloat16(), torch.randn(5, 8).bfloat16()
    refined = refine_top_logits(torch.nn.functional.linear(hidden, weight).float(), hidden, weight)
    torch.testing.assert_close(refined, hidden.float() @ weight.float().T, rtol=0, atol=1e-5)
