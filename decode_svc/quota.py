"""Time quotas of the decode instance's weighted round-robin (DESIGN.md, "Scheduling").

For the batches of one round, with t_i the predicted step time of batch i, d the TBT
target and c the switch time of a round (the distinct models' weights over the copy
bandwidth):

    n_i = d / t_i          S = sum 1 / n_i
    alpha = max(c / (min_i n_i * QMAX) + S, alpha_floor)
    q_i = c / (n_i * (alpha - S))

Batch i emits q_i / t_i tokens per round of length c + sum q_i, so its mean time between
tokens is alpha * d: the target holds on average while alpha <= 1. With alpha at its
formula value, the smallest-n batch gets exactly QMAX.

That holds only if c is everything a round spends not stepping and each quota is all
stepping of the whole batch: the caller (DecodeScheduler) puts every turn's KV swaps in c
and starts a quota's clock once the batch's KV has landed. Then the quotas' discontinuity
at c = 0 is harmless. At the alpha floor, q_i = c / (n_i (alpha - S)) -> 0 as c -> 0+
(rotation in turns of a step or so, each paying its small c), while c = 0 gets quotas of up
to QMAX; both keep the mean time between tokens at or under alpha * d (with c = 0 every
quota scale gives S * d), and a quota under one step still runs one: a round of one step
per batch lasts c + S * d < alpha * d when every q_i < t_i. What broke at small c was a c
that left out the swap-in (and a quota charged with it), not the formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_QMAX_S = 4.0
DEFAULT_ALPHA_FLOOR = 0.5


@dataclass(frozen=True)
class QuotaConfig:
    """tbt_target_s: d, the time-between-tokens target (seconds).
    qmax_s: the longest quota a batch gets in one turn (QMAX).
    alpha_floor: the lowest alpha (keeps quotas finite when the instance is nearly idle)."""

    tbt_target_s: float
    qmax_s: float = DEFAULT_QMAX_S
    alpha_floor: float = DEFAULT_ALPHA_FLOOR

    def __post_init__(self) -> None:
        if not (self.tbt_target_s > 0 and math.isfinite(self.tbt_target_s)):
            raise ValueError(f"the TBT target must be a positive number of seconds, "
                             f"got {self.tbt_target_s!r}")
        if not (self.qmax_s > 0 and math.isfinite(self.qmax_s)):
            raise ValueError(f"QMAX must be a positive number of seconds, got {self.qmax_s!r}")
        if not self.alpha_floor > 0:
            raise ValueError(f"the alpha floor must be positive, got {self.alpha_floor!r}")


@dataclass(frozen=True)
class QuotaPlan:
    """One round's quotas, in the order of the step times given."""

    alpha: float
    quotas: tuple[float, ...]  # seconds; inf for a lone batch (nothing to rotate)
    n: tuple[float, ...]  # d / t_i
    s: float  # sum 1 / n_i
    switch_s: float  # c


def compute_quotas(step_times: Sequence[float], switch_s: float, config: QuotaConfig,
                   alpha: float | None = None) -> QuotaPlan:
    """Quotas for batches with these predicted step times. alpha: fix it instead of the formula
    (the design's worked example). A lone batch runs unbounded: q = inf."""
    if not step_times:
        raise ValueError("no batches to plan")
    if any(not t > 0 for t in step_times) or switch_s < 0:
        raise ValueError(f"step times must be positive and the switch time >= 0, got {list(step_times)}, "
                         f"{switch_s}")
    d = config.tbt_target_s
    n = tuple(d / t for t in step_times)
    s = sum(1 / ni for ni in n)
    if len(step_times) == 1:
        return QuotaPlan(max(s, config.alpha_floor) if alpha is None else alpha, (math.inf,), n, s, switch_s)
    if alpha is None:
        alpha = max(switch_s / (min(n) * config.qmax_s) + s, config.alpha_floor)
    if switch_s == 0:  # free switches: the formula's limit as c -> 0 with alpha at its formula value
        quotas = tuple(config.qmax_s * min(n) / ni for ni in n)
    elif alpha <= s:
        raise ValueError(f"alpha={alpha} must exceed S={s:.4f} (sum of t_i / d) for finite quotas")
    else:
        quotas = tuple(switch_s / (ni * (alpha - s)) for ni in n)
    return QuotaPlan(alpha, quotas, n, s, switch_s)
