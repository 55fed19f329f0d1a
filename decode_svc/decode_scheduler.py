"""The decode instance's weighted round-robin (DESIGN.md, "Decode: weighted round-robin").

The work list is the instance's same-model batches in the order they joined; rounds
rotate over it. A turn:

    plan quotas for every batch now in the list (QuotaPlan)  ->  activate the model (switch;
    its KV swaps in)  ->  prefetch the next model in the rotation  ->  step until the KV has
    landed and the quota is spent (neither the switch nor the swap-in is charged)  ->  rotate

The outgoing batch's KV is swapped out by the next switch, so a lone batch is never
swapped. A model that gets work joins the list at the end and runs at its next turn, not
at the next round. A lone batch runs until another model has work.

The switch time c the quotas are planned with is what the turns of a round really pay
beyond their steps: for each turn, the switch itself (the weights not already in the free
slot, or the outgoing batch's KV swap-out, which the switch waits for: whichever is longer)
and the incoming batch's KV swap-in. The swap-in runs after the switch, beside the turn's
first steps, which serve only the sequences already landed; so the quota's clock starts
once the batch's swap-in is over (the later of the predicted end and the real one, which the
runner reports: kv_landed_at), and the turn's last step must have begun after both (a step
begun earlier may have served the first sequence alone, the others landing one after
another on the swapper however fast it is). Were the swap-in charged to the quota and left
out of c, a quota shorter than the swap-in would end the turn before the batch's last
sequences landed: they would get no token at all, turn after turn (with KV limits in the
GPU simulation, 16 models at 0.5 req/s: quotas of 3 ms, under one 9 ms step, shorter than the
batch's swap-in in 60% of turns; a step served a median 7% of its batch; some sequences
waited 160 s for a token).

Predicted step times come from profiles measured without the serving around them (gRPC
streams, the proxy, other processes on the machine); each turn measures the real mean step
and keeps a per-model correction (an exponential average of measured / predicted), so the
quotas, and the mean time between tokens they promise, hold on the machine as it is.
Switch times likewise: the prediction (weight bytes over copy bandwidth, or the outgoing
batch's KV over the swap rate if longer) stands until a switch to the model has been
measured. KV swap-ins are predicted from the batch's tokens, its model's KV block bytes and
the swapper's measured rate (Predictor.kv_swap_seconds: a live decode instance measures its
swapper once at start-up, step_profiler.measure_kv_swaps; 0 without a measurement, where KV
moves in no time: the simulator without KV limits). That measurement is the fastest of a few
round trips with nothing beside them, and it bounds the blocks from above; beside the engine's
steps the swapper may run slower. So each turn after a switch compares the swap-in that really
landed with the prediction, and every swap is scaled by the running mean of measured /
predicted, taken as 1 where the swap-in landed sooner (there the bound, not the rate, is off).
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
    landing_s: float  # the predicted KV swap-in before the quota's clock started (0: no switch)
    landed_s: float | None  # when its KV had really landed (None: the batch ended first)
    steps: int
    tokens: int
    elapsed_s: float  # from the first step to the end of the last (switch excluded)
    plan: QuotaPlan
    models: tuple[str, ...]  # the work list the plan covered, in rotation order


class Predictor:
    """Predicted step, switch and KV swap times (from profiles on an instance, or a simulator).
    step_seconds(batch): one decode step; switch_seconds(model): copying its weights;
    kv_swap_seconds(batch, direction): moving the batch's KV 'out' to the host pool or 'in'
    (None: KV moves in no time)."""

    def __init__(self, step_seconds: Callable[[BatchInfo], float], switch_seconds: Callable[[str], float],
                 kv_swap_seconds: Callable[[BatchInfo, str], float] | None = None):
        self.step_seconds = step_seconds
        self.switch_seconds = switch_seconds
        self.kv_swap_seconds = kv_swap_seconds or (lambda batch, direction: 0.0)


class DecodeScheduler(TurnPolicy):
    def __init__(self, config: QuotaConfig, predictor: Predictor) -> None:
        self.config = config
        self.predictor = predictor
        self.work_list: list[str] = []  # batches in rotation order
        self._last: str | None = None  # the model whose turn was last
        self.last: TurnRecord | None = None
        self.correction: dict[str, float] = {}  # model -> measured / predicted step time
        self.switch_measured: dict[str, float] = {}  # model -> running mean of measured switches
        self.swap_correction = 1.0  # the swapper's measured / predicted KV swap-in, at least 1

    def plan(self, runner: TurnRunner) -> tuple[QuotaPlan, str] | None:
        """Quotas for the current work list (refreshed from the runner) and whose turn is next.
        A model whose weights are still coming from disk stays out of the rotation while they
        load (its turn would hold the engine for the read); only when every model with work is
        loading does the next one's switch wait for its load."""
        with_work = runner.models_with_work()
        upcoming = self._refresh([m for m in with_work if runner.ready(m)] or with_work)
        if upcoming is None:
            return None
        batches = [runner.batch(m) for m in self.work_list]
        steps = [self._predict(b) for b in batches]
        rotating = len(batches) > 1
        switch = sum(self._turn_overhead(batches, k) for k in range(len(batches))) if rotating else 0.0
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
        batch = runner.batch(model)
        swap_in = self.predictor.kv_swap_seconds(batch, "in") if previous != model else 0.0
        predicted = self.predictor.step_seconds(batch)
        landing = swap_in * self.swap_correction
        self.last = self._serve(runner, model, plan.quotas[index], landing, plan, models)
        self._calibrate(model, predicted, self.last)
        self._calibrate_swap(swap_in, self.last)
        return True

    def _turn_overhead(self, batches: list[BatchInfo], k: int) -> float:
        """What batch k's turn pays beyond its steps: the switch to it (measured, else the longer
        of its weights' copy and the swap-out of the batch before it in the rotation, which the
        switch waits for) and its own KV's swap-in."""
        model, outgoing = batches[k].model, batches[k - 1]
        switch = self.switch_measured.get(model)
        if switch is None:
            out = self.predictor.kv_swap_seconds(outgoing, "out") * self.swap_correction
            switch = max(self.predictor.switch_seconds(model), out)
        return switch + self.predictor.kv_swap_seconds(batches[k], "in") * self.swap_correction

    @staticmethod
    def _average(averages: dict[str, float], model: str, value: float) -> None:
        old = averages.get(model, value)
        averages[model] = old + CORRECTION_WEIGHT * (value - old)

    def _predict(self, batch: BatchInfo) -> float:
        return self.predictor.step_seconds(batch) * self.correction.get(batch.model, 1.0)

    def _calibrate(self, model: str, predicted: float, record: TurnRecord) -> None:
        if record.steps < CALIBRATION_MIN_STEPS or not predicted > 0:
            return
        low, high = CORRECTION_RANGE
        ratio = min(max(record.elapsed_s / record.steps / predicted, low), high)
        self._average(self.correction, model, ratio)

    def _calibrate_swap(self, predicted: float, record: TurnRecord) -> None:
        """The prediction bounds a batch's blocks from above, at the swapper's fastest rate alone
        (measured at start-up): a swap-in that landed sooner says nothing new, one that took longer
        says the swapper runs slower beside the engine's steps, and every swap is scaled by it. A
        turn whose switch had nothing to swap in (a batch of new arrivals only) says nothing."""
        if not predicted > 0 or not record.landed_s:
            return
        ratio = min(max(record.landed_s / predicted, 1.0), CORRECTION_RANGE[1])
        self.swap_correction += CORRECTION_WEIGHT * (ratio - self.swap_correction)

    def _serve(self, runner: TurnRunner, model: str, quota: float, landing: float, plan: QuotaPlan,
               models: tuple[str, ...]) -> TurnRecord:
        """Step until the batch's KV swap-in (predicted: `landing`, which c pays for; and really: the
        runner says when it landed) and then `quota` are spent, and at least one step began after
        both: steps while KV lands serve only the landed sequences, so one that began before the
        last landed may have left some without a token."""
        start, steps, tokens, landed = runner.now(), 0, 0, None
        while runner.has_work(model):
            if landed is None:
                at = runner.kv_landed_at(model)
                landed = None if at is None else max(at - start, 0.0)
            began = runner.now()
            tokens += runner.step(model)
            steps += 1
            if landed is not None and began - start >= landing and \
                    runner.now() - start >= max(landing, landed) + quota:
                break
            if math.isinf(quota) and len(runner.models_with_work()) > 1:
                break  # a lone batch yields as soon as another model has work
        return TurnRecord(model, quota, landing, landed, steps, tokens, runner.now() - start, plan, models)

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
