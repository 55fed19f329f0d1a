"""TurnPolicy: which model an instance serves next and for how long — and the runner it drives.

Policies are pure logic over a TurnRunner: the live engine (EngineWorker), a fake in unit
tests, or the simulator all run the same classes. The Aegaeon policies (grouped-FCFS
prefill, weighted round-robin decode) and the baselines implement this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class BatchInfo:
    """A model's batch on an instance, as schedulers see it."""

    model: str
    num_seqs: int  # unfinished sequences: queued, running, swapped out or arriving
    sum_seq_len: int  # their tokens so far (what a decode step's attention reads)


class TurnRunner(Protocol):
    """What a scheduler drives: the live engine (EngineWorker's runner), a fake in unit tests,
    or the simulator. Times are seconds on the runner's clock."""

    arrivals: dict[str, str]  # request id -> model, oldest first

    def now(self) -> float: ...
    def models_with_work(self) -> list[str]: ...
    def batch(self, model: str) -> BatchInfo: ...
    def has_work(self, model: str) -> bool: ...

    def ready(self, model: str) -> bool:
        """Whether activate(model) would not wait for its weights from disk; if it would, their
        load starts in the background (MultiModelEngine.weights_ready)."""

    def activate(self, model: str) -> bool:
        """Make model the active one (a switch if needed); False if it cannot be now."""

    def prefetch(self, model: str) -> None: ...

    def kv_landed_at(self, model: str) -> float | None:
        """When the KV that the last switch to model swapped in had all landed (the runner's clock;
        -inf when it swapped none in); None while some of it is still on its way, and a step
        serves only the sequences already landed."""

    def step(self, model: str) -> int:
        """One step of the model's batch (it must be active) -> tokens produced."""


class TurnPolicy(ABC):
    """Decides which model runs next and for how long, and runs that turn."""

    @abstractmethod
    def run_turn(self, runner: TurnRunner) -> bool:
        """Serve one turn; False when no model had work."""

    def has_waiting(self) -> bool:
        """Work the policy holds outside the engine, to start in a coming turn (a prefill queue):
        while there is some, the worker must not sit idle waiting for posted calls."""
        return False

    def waiting_models(self) -> list[str]:
        """The models of that work, in the order it would start: a turn waiting for a disk load
        gives up when one of them is in memory, so that work can go first (and free the room)."""
        return []


class RoundRobinTurns(TurnPolicy):
    """Every model with work in turn, `steps` steps each (plain co-location on a decode instance)."""

    def __init__(self, steps: int = 4) -> None:
        if steps < 1:
            raise ValueError(f"steps per turn must be >= 1, got {steps}")
        self.steps = steps
        self._order: list[str] = []  # models in the order they first had work
        self._last: str | None = None

    def run_turn(self, runner: TurnRunner) -> bool:
        names = runner.models_with_work()
        if not names:
            return False
        self._order += [m for m in names if m not in self._order]
        start = self._order.index(self._last) + 1 if self._last in self._order else 0
        model = self._last = next(m for m in self._order[start:] + self._order[:start] if m in names)
        if runner.activate(model):
            for _ in range(self.steps):
                runner.step(model)
                if not runner.has_work(model):
                    break
        return True


class RequestLevelTurns(TurnPolicy):
    """Request-level scaling (the `request` baseline, ServerlessLLM's behaviour): the active model
    runs until it has no requests left, new ones of it joining its batch; then the model of the
    oldest waiting request takes the device."""

    def __init__(self) -> None:
        self.current: str | None = None

    def run_turn(self, runner: TurnRunner) -> bool:
        if self.current is None or not runner.has_work(self.current):
            self.current = next((m for m in runner.arrivals.values() if runner.has_work(m)), None)
            if self.current is None:
                with_work = runner.models_with_work()
                self.current = with_work[0] if with_work else None
        if self.current is None:
            return False
        if runner.activate(self.current):
            runner.step(self.current)
        return True


POLICIES = ("aegaeon", "static", "request")


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; expected one of {', '.join(POLICIES)}")
    return name
