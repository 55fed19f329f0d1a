"""The decode instance's weighted round-robin and its quota formula, with a fake clock and runner."""

from __future__ import annotations

import math

import pytest
from tokenpool.decode_svc.decode_scheduler import DecodeScheduler, Predictor
from tokenpool.decode_svc.quota import QuotaConfig, compute_quotas
from tokenpool.engine.turn_policy import BatchInfo


def test_the_designs_worked_example():
    """Three batches, d = 0.1 s, t = 0.025 s, c = 3 s, alpha fixed at 1: q = 3 s, a 12 s round,
    120 tokens per batch per round."""
    plan = compute_quotas([0.025] * 3, 3.0, QuotaConfig(0.1), alpha=1.0)
    assert plan.n == pytest.approx((4, 4, 4)) and plan.s == pytest.approx(0.75)
    assert plan.quotas == pytest.approx((3.0, 3.0, 3.0))
    assert 3.0 + sum(plan.quotas) == pytest.approx(12.0)
    assert plan.quotas[0] / 0.025 == pytest.approx(120)


def test_alpha_from_the_formula_gives_the_smallest_n_exactly_qmax():
    plan = compute_quotas([0.025] * 3, 3.0, QuotaConfig(0.1))
    assert plan.alpha == pytest.approx(3 / (4 * 4) + 0.75)  # 0.9375
    assert plan.quotas == pytest.approx((4.0, 4.0, 4.0))
    mixed = compute_quotas([0.01, 0.05], 1.0, QuotaConfig(0.1))  # n = 10, 2; S = 0.6
    assert mixed.alpha == pytest.approx(1 / (2 * 4) + 0.6)
    assert mixed.quotas == pytest.approx((0.8, 4.0))  # the cap binds the slow batch


def test_the_alpha_floor():
    plan = compute_quotas([0.01, 0.01], 0.1, QuotaConfig(0.1))  # S = 0.2, formula 0.2025
    assert plan.alpha == 0.5
    assert plan.quotas == pytest.approx((0.1 / (10 * 0.3),) * 2)
    low_floor = compute_quotas([0.01, 0.01], 0.1, QuotaConfig(0.1, alpha_floor=0.1))
    assert low_floor.alpha == pytest.approx(0.2025)


def test_qmax_caps_quotas_and_a_lone_batch_runs_unbounded():
    small = compute_quotas([0.025] * 3, 3.0, QuotaConfig(0.1, qmax_s=1.0))
    assert max(small.quotas) == pytest.approx(1.0)
    assert compute_quotas([0.02], 0.0, QuotaConfig(0.1)).quotas == (math.inf,)


@pytest.mark.parametrize("kwargs, needle", [
    ({"tbt_target_s": 0.0}, "TBT target"), ({"tbt_target_s": -1}, "TBT target"),
    ({"tbt_target_s": 0.1, "qmax_s": 0}, "QMAX"), ({"tbt_target_s": 0.1, "qmax_s": -2}, "QMAX"),
    ({"tbt_target_s": 0.1, "alpha_floor": 0}, "alpha floor"),
])
def test_bad_quota_config_names_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        QuotaConfig(**kwargs)


class FakeRunner:
    """Batches of fixed step time; the clock moves by a step's time and by a switch's."""

    def __init__(self, step_s: dict[str, float], switch_s: float, tokens: dict[str, int]) -> None:
        self.step_s, self.switch_s, self.left = step_s, switch_s, dict(tokens)
        self.clock = 0.0
        self.active: str | None = None
        self.arrivals: dict[str, str] = {}
        self.token_times: dict[str, list[float]] = {m: [] for m in step_s}
        self.log: list[str] = []

    def now(self) -> float:
        return self.clock

    def models_with_work(self):
        return [m for m in self.step_s if self.left.get(m, 0) > 0]

    def batch(self, model):
        return BatchInfo(model, 1, 100)

    def has_work(self, model):
        return self.left.get(model, 0) > 0

    def activate(self, model):
        if model != self.active:
            self.clock += self.switch_s
            self.active = model
            self.log.append(model)
        return True

    def prefetch(self, model):
        pass

    def step(self, model):
        assert model == self.active
        self.clock += self.step_s[model]
        self.left[model] -= 1
        self.token_times[model].append(self.clock)
        return 1


def predictor(runner: FakeRunner) -> Predictor:
    return Predictor(lambda b: runner.step_s[b.model], lambda m: runner.switch_s)


def test_mean_time_between_tokens_is_alpha_times_the_target():
    runner = FakeRunner({"a": 0.01, "b": 0.02, "c": 0.04}, switch_s=0.05, tokens=dict.fromkeys("abc", 10**6))
    scheduler = DecodeScheduler(QuotaConfig(0.1, qmax_s=1.0), predictor(runner))
    for _ in range(3 * 20):  # 20 rounds
        scheduler.run_turn(runner)
    alpha = scheduler.last.plan.alpha
    for model, times in runner.token_times.items():
        rounds_span = times[-1] - times[0]
        assert rounds_span / (len(times) - 1) == pytest.approx(alpha * 0.1, rel=0.05), model
    assert runner.log[:6] == ["a", "b", "c", "a", "b", "c"]


def test_a_new_model_joins_at_its_next_turn_and_finished_ones_leave():
    runner = FakeRunner({"a": 0.01, "b": 0.01, "c": 0.01}, switch_s=0.01, tokens={"a": 10**6, "b": 10**6})
    scheduler = DecodeScheduler(QuotaConfig(0.1, qmax_s=0.05), predictor(runner))
    scheduler.run_turn(runner)  # a
    runner.left["c"] = 10**6  # c gets work during b's turn... next in rotation after b
    scheduler.run_turn(runner)  # b
    scheduler.run_turn(runner)  # c: joined at the end, its turn comes right away
    runner.left["a"] = 0
    scheduler.run_turn(runner)  # b (a left the list)
    assert runner.log == ["a", "b", "c", "b"]
    assert scheduler.work_list == ["b", "c"]


def test_a_lone_batch_runs_until_another_model_has_work():
    runner = FakeRunner({"a": 0.01, "b": 0.01}, switch_s=0.01, tokens={"a": 50})
    scheduler = DecodeScheduler(QuotaConfig(0.1), predictor(runner))
    scheduler.run_turn(runner)
    assert runner.left["a"] == 0 and math.isinf(scheduler.last.quota_s)

    class Arriving(FakeRunner):
        def step(self, model):
            if len(self.token_times[model]) == 5:
                self.left["b"] = 3  # b arrives mid-turn
            return super().step(model)

    runner = Arriving({"a": 0.01, "b": 0.01}, switch_s=0.01, tokens={"a": 50})
    scheduler = DecodeScheduler(QuotaConfig(0.1), predictor(runner))
    scheduler.run_turn(runner)
    assert scheduler.last.steps == 6 and runner.left["a"] == 44
    scheduler.run_turn(runner)
    assert runner.log == ["a", "b"]


def test_quotas_follow_the_measured_step_when_the_profile_is_off():
    runner = FakeRunner({"a": 0.02, "b": 0.04}, switch_s=0.05, tokens=dict.fromkeys("ab", 10**6))
    wrong = Predictor(lambda b: runner.step_s[b.model] / 2, lambda m: runner.switch_s)  # twice too fast
    scheduler = DecodeScheduler(QuotaConfig(0.1, qmax_s=1.0), wrong)
    for _ in range(2 * 10):
        scheduler.run_turn(runner)
    assert scheduler.correction == pytest.approx({"a": 2.0, "b": 2.0}, rel=0.01)
    start = {m: len(t) for m, t in runner.token_times.items()}
    for _ in range(2 * 10):
        scheduler.run_turn(runner)
    alpha = scheduler.last.plan.alpha
    for model, times in runner.token_times.items():
        later = times[start[model] - 1:]
        assert (later[-1] - later[0]) / (len(later) - 1) == pytest.approx(alpha * 0.1, rel=0.05), model
