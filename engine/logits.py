"""Logits from a narrow-dtype lm_head, with the leaders recomputed in float32.

A bf16 matmul accumulates in float32 but rounds its output to bf16: a logit near 25 comes
back on a grid of 0.125, half a step off at worst, so two leaders within a few hundredths
of each other (SmolLM2's first answer token to the chat template: 25.36 against 25.26 in
float32) tie or swap. Re-doing the dot products of every token within two bf16 steps of
a row's rounded maximum (the same bf16 operands, float32 products and sums, no rounding at
the end) makes the argmax exact: a token whose exact logit beats the leader's cannot be
rounded further down than that. The rest of the row keeps the matmul's values.

On the CPU one fused kernel (csrc/logits.cpp) does it in two passes over each row; the
torch code below is the same rule, for other devices or without the extension.
"""

from __future__ import annotations

import torch

from . import cpu_extension


def refine_top_logits(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """logits: [n, vocab] float32, the rounded hidden @ weight.T; hidden: [n, H] and
    weight: [vocab, H] in the compute dtype. -> logits, the near-maximum entries of each row
    replaced (in place) by their float32 dot products."""
    fits = (logits.is_cpu and logits.is_contiguous() and hidden.dtype in (torch.float32, torch.bfloat16)
            and hidden.stride(-1) == 1 and weight.stride(-1) == 1)
    kernels = cpu_extension.module() if fits else None
    if kernels is not None:
        kernels.refine_logits(logits, hidden, weight)
        return logits
    top = logits.max(dim=-1, keepdim=True).values
    # two bf16 steps in the leader's binade: 2^(floor(log2 |max|) - 6)
    margin = torch.exp2(torch.floor(torch.log2(top.abs().clamp_min(1e-30))) - 6)
    rows, cols = (logits >= top - margin).nonzero(as_tuple=True)
    logits[rows, cols] = (hidden[rows].float() * weight[cols].float()).sum(-1)
    return logits
