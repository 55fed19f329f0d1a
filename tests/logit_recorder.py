"""A greedy sampler that keeps every step's logits (float32, on the CPU): what a test compares
two engines' computations by, beyond their tokens."""

from __future__ import annotations

import torch
from tokenpool.engine.sampler import Sampler


class LogitRecorder(Sampler):
    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []

    def sample(self, logits, seqs):
        self.logits.append(logits.detach().float().cpu().clone())  # a copy: a step may reuse its buffer
        return super().sample(logits, seqs)
