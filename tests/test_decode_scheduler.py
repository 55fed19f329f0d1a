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
        self.loading: set[str] = set()  # models whose weights are still coming from disk

    def now(self) -> float:
        return self.clock

    def models_with_work(self):
        return [m for m in self.step_s if self.left.get(m, 0) > 0]

    def batch(self, model):
        return BatchInfo(model, 1, 100)

    def has_work(self, model):
        return self.left.get(model, 0) > 0

    def ready(self, model):
        return model not in self.loading

    def activate(self, model):
        if model != self.active:
            self.clock += self.switch_s
            self.active = model
            self.log.append(model)
        return True

    def prefetch(self, model):
        pass

    def kv_landed_at(self, model):
        return -math.inf  # no KV moves

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


class SwappingRunner(FakeRunner):
    """Batches of several sequences whose KV swaps as the engine's does: a switch waits for the
    outgoing batch's swap-out, then the incoming batch's sequences land one after another
    (swap_s each) while its first steps run; a step serves only the landed sequences."""

    def __init__(self, step_s: dict[str, float], seqs: int, swap_s: float) -> None:
        super().__init__(step_s, switch_s=0.0, tokens=dict.fromkeys(step_s, 10**6))
        self.seqs, self.swap_s = seqs, swap_s
        self.turn_steps: list[list[int]] = []  # sequences served by each step, turn by turn
        self.landing: dict[str, list[float]] = {m: [0.0] * seqs for m in step_s}
        self.seq_times: dict[tuple[str, int], list[float]] = {(m, i): [] for m in step_s for i in range(seqs)}

    def batch(self, model):
        return BatchInfo(model, self.seqs, 100 * self.seqs)

    def activate(self, model):
        if model != self.active:
            if self.active is not None:
                self.clock += self.seqs * self.swap_s  # the outgoing batch's swap-out
            self.landing[model] = [self.clock + (i + 1) * self.swap_s for i in range(self.seqs)]
            self.active = model
            self.log.append(model)
            self.turn_steps.append([])
        return True

    def kv_landed_at(self, model):
        last = max(self.landing[model])
        return last if last <= self.clock else None

    def step(self, model):
        assert model == self.active
        self.clock = max(self.clock, min(self.landing[model]))  # waits for the first to land
        landed = [i for i, t in enumerate(self.landing[model]) if t <= self.clock]
        self.clock += self.step_s[model]
        for i in landed:
            self.seq_times[(model, i)].append(self.clock)
        self.token_times[model].append(self.clock)
        self.turn_steps[-1].append(len(landed))
        return len(landed)


def swapping_predictor(runner: SwappingRunner) -> Predictor:
    return Predictor(lambda b: runner.step_s[b.model], lambda m: 0.0,
                     lambda b, direction: b.num_seqs * runner.swap_s)


def test_the_plan_pays_for_the_kv_swaps_of_every_turn():
    """c = for each turn, the switch (before one is measured: the longer of the weights' copy and
    the swap-out of the batch before it, which the switch waits for) plus the batch's swap-in."""
    runner = SwappingRunner({"a": 0.009, "b": 0.009}, seqs=8, swap_s=0.001)
    scheduler = DecodeScheduler(QuotaConfig(0.1), swapping_predictor(runner))
    plan, model = scheduler.plan(runner)
    assert model == "a" and plan.switch_s == pytest.approx(2 * (0.008 + 0.008))
    weights = Predictor(lambda b: 0.009, lambda m: 0.5, lambda b, direction: 0.008)
    plan = DecodeScheduler(QuotaConfig(0.1), weights).plan(runner)[0]
    assert plan.switch_s == pytest.approx(2 * (0.5 + 0.008))


def test_short_quotas_leave_no_sequence_without_tokens_while_kv_swaps_in():
    """Two batches of 8 sequences, steps of 9 ms, each sequence's KV 1 ms to move: alpha is at its
    0.5 floor and the quotas are under one step. Every sequence's mean time between tokens must
    stay under the TBT target: had the swap-in been charged to the quota (and left out of c),
    each turn would end after one step that only the first landed sequence took part in."""
    runner = SwappingRunner({"a": 0.009, "b": 0.009}, seqs=8, swap_s=0.001)
    scheduler = DecodeScheduler(QuotaConfig(0.1), swapping_predictor(runner))
    for _ in range(2 * 10):  # until the switches are measured
        scheduler.run_turn(runner)
    before = {seq: len(times) for seq, times in runner.seq_times.items()}
    for _ in range(2 * 50):
        scheduler.run_turn(runner)
    plan = scheduler.last.plan
    assert plan.alpha == 0.5 and max(plan.quotas) <= 0.009 + 1e-9
    assert scheduler.last.landing_s == pytest.approx(0.008)
    for seq, times in runner.seq_times.items():
        later = times[before[seq] - 1:]
        assert len(later) > 50, seq  # a token every turn of its batch, at least
        assert (later[-1] - later[0]) / (len(later) - 1) <= 0.1, seq


def test_without_kv_predictions_a_turn_is_as_before():
    """No swap predictor (KV moves in no time): c is the switches alone, the quota's clock starts
    at the turn's first step, and a quota shorter than a step still gives one step."""
    runner = FakeRunner({"a": 0.02, "b": 0.02}, switch_s=0.001, tokens=dict.fromkeys("ab", 10**6))
    scheduler = DecodeScheduler(QuotaConfig(0.1), predictor(runner))
    for _ in range(4):
        scheduler.run_turn(runner)
    assert scheduler.last.landing_s == 0.0 and scheduler.last.steps == 1
    assert scheduler.last.plan.switch_s == pytest.approx(0.002)


def test_a_turn_ends_only_after_a_step_that_began_once_its_kv_had_landed():
    """The quota's clock starts after the predicted swap-in, and the turn's last step must have
    begun after it: a step that began while KV was landing served only the landed sequences,
    even if it ended after the landing and a tiny quota."""
    runner = SwappingRunner({"a": 0.009, "b": 0.009}, seqs=8, swap_s=0.001)
    fast = Predictor(lambda b: 0.001, lambda m: 0.0, lambda b, direction: b.num_seqs * runner.swap_s)
    scheduler = DecodeScheduler(QuotaConfig(0.1), fast)  # n = 100: quotas well under a millisecond
    scheduler.run_turn(runner)
    assert scheduler.last.quota_s < 0.001 and scheduler.last.steps == 2
    assert all(runner.seq_times[("a", i)] for i in range(8))


def test_a_swapper_slower_than_predicted_still_serves_every_sequence_each_turn_and_c_follows_it():
    """The KV swaps in at a third of the predicted rate (a swapper slowed by the steps beside it):
    every turn still ends with a step that served the whole batch, the landing the scheduler
    measures scales every swap it predicts, and the plan's c then pays what the turns do: each
    switch (measured: the outgoing batch's 48 ms swap-out) and each swap-in (48 ms, not 16), so
    every sequence's mean time between tokens holds the plan's alpha * d (the batch's last to
    land ran 1.19x over it with the swap-in left as predicted)."""
    runner = SwappingRunner({"a": 0.009, "b": 0.009}, seqs=16, swap_s=0.003)
    optimistic = Predictor(lambda b: runner.step_s[b.model], lambda m: 0.0,
                           lambda b, direction: b.num_seqs * 0.001)
    scheduler = DecodeScheduler(QuotaConfig(0.1, qmax_s=0.05), optimistic)
    for _ in range(2 * 10):
        scheduler.run_turn(runner)
    assert all(turn[-1] == 16 for turn in runner.turn_steps), "a turn ended before its batch had landed"
    assert scheduler.last.landed_s == pytest.approx(0.048)
    assert scheduler.last.landing_s == pytest.approx(0.048, rel=1e-3)  # 16 x 1 ms, scaled by the swapper's 3x
    assert scheduler.swap_correction == pytest.approx(3.0, rel=0.01)
    assert scheduler.last.plan.switch_s == pytest.approx(2 * (0.048 + 0.048), rel=1e-3)
    start = {seq: len(t) for seq, t in runner.seq_times.items()}
    for _ in range(2 * 20):
        scheduler.run_turn(runner)
    plan = scheduler.last.plan
    assert plan.alpha > QuotaConfig(0.1).alpha_floor  # the formula's alpha, not the floor
    for seq, times in runner.seq_times.items():
        later = times[start[seq] - 1:]
        assert (later[-1] - later[0]) / (len(later) - 1) <= plan.alpha * 0.1, seq


def test_a_swapper_faster_than_predicted_leaves_the_prediction_as_it_is():
    """Predictions bound the blocks from above at the swapper's fastest rate: a batch that lands
    sooner does not shrink them (the step after the predicted landing still serves everyone)."""
    runner = SwappingRunner({"a": 0.009, "b": 0.009}, seqs=8, swap_s=0.0005)
    predicted = Predictor(lambda b: 0.009, lambda m: 0.0, lambda b, direction: b.num_seqs * 0.001)
    scheduler = DecodeScheduler(QuotaConfig(0.1), predicted)
    for _ in range(2 * 10):
        scheduler.run_turn(runner)
    assert scheduler.swap_correction == 1.0
    assert scheduler.last.landed_s == pytest.approx(0.004)
    assert scheduler.last.landing_s == pytest.approx(0.008)


def test_a_batchs_kv_swap_is_bounded_by_its_blocks_at_the_measured_rate():
    """Sequences take whole blocks: 2 sequences of 20 tokens in 16-token blocks are at most
    ceil((20 + 2 * 15) / 16) = 4 blocks (really 1 + 1 to 1 + 2); a model without measured swap
    times moves its KV in no time."""
    from types import SimpleNamespace

    from tokenpool.decode_svc.decode_policy import batch_kv_swap_seconds
    from tokenpool.engine.step_time_model import KVSwapTime

    swap = batch_kv_swap_seconds(SimpleNamespace(kv_swap={"a": KVSwapTime(16, 1000, 1.0, 2.0)}))
    assert swap(BatchInfo("a", 2, 20), "out") == pytest.approx(4 * 1000 / 1e9)
    assert swap(BatchInfo("a", 2, 20), "in") == pytest.approx(4 * 1000 / 2e9)
    assert swap(BatchInfo("a", 0, 0), "in") == 0.0 and swap(BatchInfo("b", 5, 500), "in") == 0.0


def test_a_model_loading_from_disk_sits_out_the_rotation_until_its_weights_are_in():
    runner = FakeRunner({"a": 0.01, "b": 0.01, "cold": 0.01}, switch_s=0.01, tokens=dict.fromkeys(
        ("a", "b", "cold"), 10**6))
    runner.loading = {"cold"}
    scheduler = DecodeScheduler(QuotaConfig(0.1, qmax_s=0.05), predictor(runner))
    for _ in range(4):
        scheduler.run_turn(runner)
    assert runner.log == ["a", "b", "a", "b"] and "cold" not in scheduler.work_list
    runner.loading.clear()  # its load ended: it joins at the end of the list, after b: next
    for _ in range(3):
        scheduler.run_turn(runner)
    assert runner.log[4:] == ["cold", "a", "b"]
    runner.loading = {"a", "b", "cold"}  # every model loading: the rotation goes on (the switch waits)
    scheduler.run_turn(runner)
    assert runner.log[7:] == ["cold"]  # after b, as the rotation has it
