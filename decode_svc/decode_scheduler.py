"""The decode instance's weighted round-robin (DESIGN.md, "Decode: weighted round-robin").

The work list is the instance's same-model batches in the order they joined; rounds
rotate over it. A turn:

    plan quotas for every batch now in the list (QuotaPlan)  ->  activate the model (switch;
    its KV swaps in)  ->  prefetch the next model in the rotation  ->  step until the quota
    is spent (the switch is not charged)  ->  rotate

The outgoing batch's KV is swapped out by the next switch, so a lone batch is never
swapped. A model that gets work joins the list at the end and runs at its next turn, not
at the next round. A lone batch runs until another model has work.

Predicted step times come from profiles measured without the serving around them (gRPC
streams, the proxy, other processes on the machine); each turn measures the real mean step
and keeps a per-model correction (an exponential average of measured / predicted), so the
quotas, and the mean time between tokens they promise, hold on the machine as it is.
Switch times likewise: the prediction (weight bytes over copy bandwidth) stands until a
switch to the model has been measured (which also pays the KV swaps the bytes leave out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from tokenpool.engine.turn_policy import BatchInfo, TurnPolicy, TurnRunner

from .quota import QuotaConfig, QuotaPlan, compute_quotas

CALIBRATION_MIN_STEPS = 3  # a turn this short says little about the step time
CORRECTION_WEIGHT = 0.5  # of the newest turn in the running correction
CORRECTION_RANGE = (0.25, 8.0)  # a measurement outside says more about a hiccup than the model


@dataclass(frozen=True)
class TurnRecord:
    """What one turn did (for status, logs and tests)."""

    model: str
    quota_s: float
    steps: int
    tokens: int
    elapsed_s: float  # from the first step to the end of the last (switch excluded)
    plan: QuotaPlan
    models: tuple[str, ...]  # the work list the plan covered, in rotation order


class Predictor:
    """Predicted step and switch times per model (from profiles on an instance, or a simulator)."""

    def __init__(self, step_seconds: Callable[[BatchInfo], float], switch_seconds: Callable[[str], float]):
        self.step_seconds = step_seconds
        self.switch_seconds = switch_seconds


class DecodeScheduler(TurnPolicy):
    def __init__(self, config: QuotaConfig, predictor: Predictor) -> None:
        self.config = config
        self.predictor = predictor
        self.work_list: list[str] = []  # batches in rotation order
        self._last: str | None = None  # the model whose turn was last
        self.last: TurnRecord | None = None
        self.correction: dict[str, float] = {}  # model -> measured / predicted step time
        self.switch_measured: dict[str, float] = {}  # model -> running mean of measured switches

    def plan(self, runner: TurnRunner) -> tuple[QuotaPlan, str] | None:
        """Quotas for the current work list (refreshed from the runner) and whose turn is next."""
        upcoming = self._refresh(runner.models_with_work())
        if upcoming is None:
            return None
        steps = [self._predict(runner, m) for m in self.work_list]
        switch = sum(map(self._switch_seconds, self.work_list)) if len(self.work_list) > 1 else 0.0
        return compute_quotas(steps, switch, self.config), upcoming

    def run_turn(self, runner: TurnRunner) -> bool:
        planned = self.plan(runner)
        if planned is None:
            return False
        plan, model = planned
        models = tuple(self.work_list)
        index = models.index(model)
        previous, self._last = self._last, model
        started = runner.now()
        if not runner.activate(model):
            return True
        if previous is not None and previous != model:
            self._average(self.switch_measured, model, runner.now() - started)
        if len(models) > 1:
            runner.prefetch(models[(index + 1) % len(models)])
        predicted = self.predictor.step_seconds(runner.batch(model))
        self.last = self._serve(runner, model, plan.quotas[index], plan, models)
        self._calibrate(model, predicted, self.last)
        return True

    def _switch_seconds(self, model: str) -> float:
        return self.switch_measured.get(model, self.predictor.switch_seconds(model))

    @staticmethod
    def _average(averages: dict[str, float], model: str, value: float) -> None:
        old = averages.get(model, value)
        averages[model] = old + CORRECTION_WEIGHT * (value - old)

    def _predict(self, runner: TurnRunner, model: str) -> float:
        return self.predictor.step_seconds(runner.batch(model)) * self.correction.get(model, 1.0)

    def _calibrate(self, model: str, predicted: float, record: TurnRecord) -> None:
        if record.steps < CALIBRATION_MIN_STEPS or not predicted > 0:
            return
        low, high = CORRECTION_RANGE
        ratio = min(max(record.elapsed_s / record.steps / predicted, low), high)
        self._average(self.correction, model, ratio)

    def _serve(self, runner: TurnRunner, model: str, quota: float, plan: QuotaPlan,
               models: tuple[str, ...]) -> TurnRecord:
        start, steps, tokens = runner.now(), 0, 0
        while runner.has_work(model):
            tokens += runner.step(model)
            steps += 1
            if runner.now() - start >= quota:
                break
            if math.isinf(quota) and len(runner.models_with_work()) > 1:
                break  # a lone batch yields as soon as another model has work
        return TurnRecord(model, quota, steps, tokens, runner.now() - start, plan, models)

    def _refresh(self, with_work: list[str]) -> str | None:
        """Drop batches without work, append new ones at the end -> the model whose turn is next:
        the first with work after the last one served, in rotation order."""
        old = self.work_list
        full = [m for m in old if m in with_work or m == self._last]
        full += [m for m in with_work if m not in old]
        self.work_list = [m for m in full if m in with_work]
        if not self.work_list:
            return None
        if self._last in full:
            i = full.index(self._last)
            full = full[i + 1:] + full[:i + 1]
        return next(m for m in full if m in with_work)
