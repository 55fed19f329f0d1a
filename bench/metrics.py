"""SLO attainment as the paper measures it, the plain per-token deadline version beside
it, per-load summaries and goodput.

All times are absolute seconds on one clock: a request's arrival and the times its
output tokens were emitted (non-decreasing, none before the arrival).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np


@dataclass(frozen=True)
class SLO:
    ttft_s: float  # time to first token, from arrival
    tbt_s: float  # time between tokens

    def __post_init__(self):
        for name in ("ttft_s", "tbt_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SLO {name} must be a positive finite number, got {value!r}")


class RequestResult(msgspec.Struct, frozen=True):
    """What a benchmark observed of one request."""

    arrival_s: float
    token_times: list[float]
    finished: bool = True


@dataclass(frozen=True)
class LoadPoint:
    load: float  # rate per model, or number of models: whatever the sweep varies
    attainment: float  # mean per-request attainment, unfinished requests counting 0
    ttft_p50: float  # seconds, over finished requests; nan if none
    ttft_p99: float
    tbt_p50: float  # seconds, over every gap between consecutive tokens of finished requests
    tbt_p99: float


def attainment(arrival_s: float, token_times: Sequence[float], slo: SLO, finished: bool = True) -> float:
    """The paper's SLO attainment of one request, in [0, 1].

    A running target starts at TTFT and grows by TBT after every token, late or not; it
    is measured from the start of the current segment (first the arrival). A token on
    time (time since the segment start <= target) sets the segment's credit to the
    current target; a late token adds the segment's credit to the total and opens a new
    segment at itself with credit zero. The segment still open at the end contributes
    min(target, last token time - segment start) *instead of* its credit (adding both
    would count it twice). Attainment = total / (last token time - arrival).

    Arrival 0, tokens at 3, 6, 7, 8 s, TTFT 3, TBT 2: token 3 on time (3 <= 3, credit 3,
    target -> 5); token 6 late (6 > 5: total 3, segment starts at 6, target -> 7); tokens
    7 and 8 on time; the end adds min(11, 8 - 6) = 2; attainment (3 + 2) / 8 = 5/8.

    Edge cases: unfinished or no tokens -> 0; a single token -> 1 if on time (<= TTFT),
    else 0; every token at the arrival instant (zero span) -> 1.
    """
    _check_times(arrival_s, token_times)
    if not finished or not token_times:
        return 0.0
    span = token_times[-1] - arrival_s
    if span <= 0:
        return 1.0
    total, credit, start, target = 0.0, 0.0, arrival_s, slo.ttft_s
    for t in token_times:
        if t - start <= target:
            credit = target
        else:
            total += credit
            credit, start = 0.0, t
        target += slo.tbt_s
    total += min(target, token_times[-1] - start)
    return min(1.0, max(0.0, total / span))


def deadline_attainment(
    arrival_s: float, token_times: Sequence[float], slo: SLO, finished: bool = True
) -> float:
    """Fraction of tokens on time, token i (from 0) being due at arrival + TTFT + i * TBT.
    Unfinished or no tokens -> 0."""
    _check_times(arrival_s, token_times)
    if not finished or not token_times:
        return 0.0
    on_time = sum(t <= arrival_s + slo.ttft_s + i * slo.tbt_s for i, t in enumerate(token_times))
    return on_time / len(token_times)


def _check_times(arrival_s: float, token_times: Sequence[float]) -> None:
    previous = arrival_s
    for i, t in enumerate(token_times):
        if t < previous:
            raise ValueError(
                f"token_times[{i}] = {t!r} is earlier than {'the arrival' if i == 0 else 'the token before'} "
                f"({previous!r}); token times must be non-decreasing and not before arrival_s"
            )
        previous = t


def summarize(load: float, requests: Sequence[RequestResult], slo: SLO) -> LoadPoint:
    """One sweep point: mean attainment over all requests (unfinished ones count 0) and
    TTFT / TBT percentiles over finished requests that emitted tokens."""
    if not requests:
        raise ValueError(f"summarize needs at least one request (load {load!r} had none)")
    mean = float(np.mean([attainment(r.arrival_s, r.token_times, slo, r.finished) for r in requests]))
    done = [r for r in requests if r.finished and r.token_times]
    ttft = [r.token_times[0] - r.arrival_s for r in done]
    tbt = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    return LoadPoint(load, mean, *_p50_p99(ttft), *_p50_p99(tbt))


def _p50_p99(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


def goodput(points: Sequence[LoadPoint], threshold: float = 0.9) -> float:
    """The highest load such that it and every lower load in the sweep reach mean
    attainment >= threshold: a point above threshold after a dip does not count.
    ValueError if the lowest load already misses it."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if not points:
        raise ValueError("goodput needs at least one load point")
    ordered = sorted(points, key=lambda p: p.load)
    best = None
    for point in ordered:
        if not point.attainment >= threshold:  # nan fails too
            break
        best = point.load
    if best is None:
        lowest = ordered[0]
        raise ValueError(
            f"the sweep never reaches {threshold:.0%} attainment; lowest load {lowest.load:g} "
            f"gave {lowest.attainment:.1%}"
        )
    return best
