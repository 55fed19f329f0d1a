"""SLO attainment, the per-token deadline version, load summaries and goodput."""

from __future__ import annotations

import math

import pytest
from tokenpool.bench.metrics import (
    SLO,
    LoadPoint,
    RequestResult,
    attainment,
    deadline_attainment,
    goodput,
    summarize,
)

SLO_3_2 = SLO(ttft_s=3.0, tbt_s=2.0)
SLO_1_1 = SLO(ttft_s=1.0, tbt_s=1.0)


def test_worked_example_from_the_design():
    # Token 3 on time (credit 3), 6 late (closes 3, new segment at 6), 7 and 8 on time; end adds min(11, 2).
    assert attainment(0.0, [3.0, 6.0, 7.0, 8.0], SLO_3_2) == pytest.approx(5 / 8)


def test_all_tokens_on_time_score_one():
    assert attainment(1.0, [2.0, 3.0, 4.0], SLO_3_2) == 1.0
    assert deadline_attainment(1.0, [2.0, 3.0, 4.0], SLO_3_2) == 1.0


def test_one_late_token_in_the_middle():
    # Due at 1, 2, 3, 4, 5. Segment one: tokens 1, 2 (credit 2); token 10 is late and opens segment two,
    # whose end adds min(target 6, 12 - 10) = 2. (2 + 2) / 12.
    times = [1.0, 2.0, 10.0, 11.0, 12.0]
    assert attainment(0.0, times, SLO_1_1) == pytest.approx(4 / 12)
    assert deadline_attainment(0.0, times, SLO_1_1) == pytest.approx(2 / 5)


def test_deadline_version_of_the_worked_example():
    # Due at 3, 5, 7, 9: only the token at 6 misses.
    assert deadline_attainment(0.0, [3.0, 6.0, 7.0, 8.0], SLO_3_2) == pytest.approx(3 / 4)


def test_unfinished_or_empty_requests_score_zero():
    assert attainment(0.0, [1.0, 2.0], SLO_3_2, finished=False) == 0.0
    assert deadline_attainment(0.0, [1.0, 2.0], SLO_3_2, finished=False) == 0.0
    assert attainment(0.0, [], SLO_3_2) == 0.0
    assert deadline_attainment(0.0, [], SLO_3_2) == 0.0


def test_single_token_edge_cases():
    assert attainment(10.0, [12.0], SLO_3_2) == 1.0
    assert attainment(10.0, [13.0], SLO_3_2) == 1.0  # exactly at the TTFT is on time
    assert attainment(10.0, [14.0], SLO_3_2) == 0.0
    assert attainment(10.0, [10.0, 10.0], SLO_3_2) == 1.0  # zero span


def test_late_first_token_then_steady_stream():
    # First token at 5 > TTFT 3: segment one closes with credit 0; tokens 6, 7 are on time
    # in segment two, whose end adds min(9, 7 - 5) = 2. 2 / 7.
    assert attainment(0.0, [5.0, 6.0, 7.0], SLO_3_2) == pytest.approx(2 / 7)


def test_token_times_must_not_go_backwards():
    with pytest.raises(ValueError, match=r"token_times\[0\].*arrival"):
        attainment(5.0, [4.0], SLO_3_2)
    with pytest.raises(ValueError, match=r"token_times\[2\]"):
        deadline_attainment(0.0, [1.0, 2.0, 1.5], SLO_3_2)


@pytest.mark.parametrize("ttft, tbt", [(0.0, 1.0), (1.0, -0.1), (math.nan, 1.0), (1.0, math.inf)])
def test_slo_rejects_non_positive_values(ttft, tbt):
    with pytest.raises(ValueError, match="SLO"):
        SLO(ttft_s=ttft, tbt_s=tbt)


def test_summarize_means_attainment_and_takes_percentiles_of_finished_requests():
    requests = [
        RequestResult(arrival_s=0.0, token_times=[3.0, 6.0, 7.0, 8.0]),  # 5/8
        RequestResult(arrival_s=1.0, token_times=[2.0, 3.0, 4.0]),  # 1
        RequestResult(arrival_s=0.0, token_times=[50.0], finished=False),  # 0, no latencies
    ]
    point = summarize(0.5, requests, SLO_3_2)
    assert point.load == 0.5
    assert point.attainment == pytest.approx((5 / 8 + 1 + 0) / 3)
    assert point.ttft_p50 == pytest.approx(2.0)  # TTFTs 3 and 1
    assert point.tbt_p50 == pytest.approx(1.0)  # gaps 3, 1, 1, 1, 1
    assert point.tbt_p99 == pytest.approx(2.92)  # numpy's linear interpolation


def test_summarize_gives_nan_latencies_when_nothing_finished():
    point = summarize(1.0, [RequestResult(arrival_s=0.0, token_times=[], finished=False)], SLO_3_2)
    assert point.attainment == 0.0
    assert all(math.isnan(v) for v in (point.ttft_p50, point.ttft_p99, point.tbt_p50, point.tbt_p99))
    with pytest.raises(ValueError, match="at least one request"):
        summarize(1.0, [], SLO_3_2)


def _points(*pairs: tuple[float, float]) -> list[LoadPoint]:
    return [LoadPoint(load, att, 0.0, 0.0, 0.0, 0.0) for load, att in pairs]


def test_goodput_is_the_highest_load_before_the_first_miss():
    points = _points((0.3, 0.85), (0.1, 0.99), (0.2, 0.95), (0.4, 0.95))  # unsorted, dip at 0.3
    assert goodput(points) == 0.2
    assert goodput(points, threshold=0.8) == 0.4
    assert goodput(_points((16, 0.9), (32, 0.9))) == 32  # exactly the threshold counts


def test_goodput_raises_when_the_sweep_never_reaches_the_threshold():
    with pytest.raises(ValueError, match=r"never reaches 90% attainment; lowest load 0.1 gave 50.0%"):
        goodput(_points((0.2, 0.95), (0.1, 0.5)))
    with pytest.raises(ValueError, match="never reaches"):
        goodput(_points((0.1, math.nan)))
    with pytest.raises(ValueError, match="at least one"):
        goodput([])
