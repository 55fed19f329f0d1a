"""Logits from a narrow-dtype lm_head, with the leaders recomputed in float32.

A bf16 matmul accumulates in float32 but rounds its output to bf16: a logit near 25 comes
back on a grid of 0.125, half a step off at worst, so two leaders within a few hundredths
of each other (SmolLM2's first answer token to the chat template: 25.36 against 25.26 in
float32) tie or swap. Re-doing the dot products of the few candidates near the top of each
row in float32 (the same bf16 operands, float32 products and sums, no rounding at the end)
makes argmax and the head of the distribution exact at the cost of k rows of the weight.
"""

from __future__ import annotations

import torch

CANDIDATES = 16  # per row; more than the few within one bf16 step of the top on real models


def refine_top_logits(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                      k: int = CANDIDATES) -> torch.Tensor:
    """logits: [n, vocab] float32, the bf16-rounded hidden @ weight.T; hidden: [n, H] and
    weight: [vocab, H] in the compute dtype. -> logits with each row's top k replaced by
    their float32 dot products (in place)."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices  # [n, k]
    rows = weight[top].float()  # [n, k, H]
    exact = torch.bmm(rows, hidden.float().unsqueeze(-1)).squeeze(-1)  # [n, k]
    return logits.scatter_(1, top, exact)
