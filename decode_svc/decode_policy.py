"""make_decode_policy: the decode instance's TurnPolicy for a policy name, with its checks.

    aegaeon  weighted round-robin with SLO-derived quotas (DecodeScheduler)
    static   one model per instance: it just runs (round-robin, which never rotates)
    request  request-level scaling: a model runs to completion, then the oldest waiting one
"""

from __future__ import annotations

from collections.abc import Callable

from tokenpool.engine.step_profiler import InstanceTimings
from tokenpool.engine.turn_policy import (
    BatchInfo,
    RequestLevelTurns,
    RoundRobinTurns,
    TurnPolicy,
    check_policy,
)

from .decode_scheduler import DecodeScheduler, Predictor
from .quota import DEFAULT_QMAX_S, QuotaConfig

# On GPUs the TBT target (100 ms) is about 4x a single sequence's decode step; a CPU run
# scales it the same way from the measured step (DESIGN.md, "Measuring what matters").
DEFAULT_TBT_STEPS = 4.0
REFERENCE_CONTEXT = 128  # tokens of context for the "single-sequence step" above


def default_tbt_s(timings: InstanceTimings) -> float:
    """DEFAULT_TBT_STEPS x the slowest model's single-sequence decode step."""
    return DEFAULT_TBT_STEPS * max(p.decode.predict(REFERENCE_CONTEXT, 1) for p in timings.profiles.values())


def batch_kv_swap_seconds(timings: InstanceTimings) -> Callable[[BatchInfo, str], float]:
    """A batch's KV swap, 'out' or 'in', from its model's measured KVSwapTime (0 without one):
    its blocks' bytes at the swapper's rate. Sequences take whole blocks, so sum_seq_len plus
    block_size - 1 tokens a sequence bounds them from above (the batch's lengths are not known
    one by one); one task per sequence on the swapper, as it runs them, one after another."""
    def seconds(batch: BatchInfo, direction: str) -> float:
        times = timings.kv_swap.get(batch.model)
        if times is None or batch.num_seqs == 0:
            return 0.0
        return times.seconds(batch.sum_seq_len + batch.num_seqs * (times.block_size - 1), direction)

    return seconds


def make_decode_policy(policy: str, timings: InstanceTimings, tbt_ms: float | None = None,
                       qmax_s: float = DEFAULT_QMAX_S) -> TurnPolicy:
    """ValueError naming the value for an unknown policy, a TBT target no model's single step can
    meet, or a QMAX that is not positive."""
    check_policy(policy)
    if policy == "request":
        return RequestLevelTurns()
    if policy == "static":
        return RoundRobinTurns()
    tbt_s = default_tbt_s(timings) if tbt_ms is None else tbt_ms / 1e3
    for model, profile in timings.profiles.items():
        fastest = profile.decode.predict(1, 1)
        if tbt_s <= fastest:
            raise ValueError(f"TBT target {tbt_s * 1e3:g} ms is below the fastest decode step of {model} "
                             f"({fastest * 1e3:.3f} ms, one sequence of one token): no batch could meet it")
    config = QuotaConfig(tbt_s, qmax_s)
    return DecodeScheduler(config, Predictor(timings.step_seconds, timings.switch_seconds,
                                             batch_kv_swap_seconds(timings)))
