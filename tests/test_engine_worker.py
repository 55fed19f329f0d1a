"""EngineWorker and its turn policies, over a fake engine (no model)."""

from __future__ import annotations

import threading
import time

from tokenpool.engine.engine_worker import EngineWorker, FifoTurns, RoundRobinTurns, Turn
from tokenpool.engine.request_book import RequestOutput


class FakeEngine:
    """Each model has a count of steps left; step() records the model and returns no output."""

    def __init__(self, work: dict[str, int]) -> None:
        self.models = dict.fromkeys(work)
        self.work = dict(work)
        self.steps: list[str] = []

    def has_unfinished(self, model: str | None = None) -> bool:
        return any(self.work[m] > 0 for m in ([model] if model else self.work))

    def step(self, model: str) -> list[RequestOutput]:
        self.work[model] -= 1
        self.steps.append(model)
        done = self.work[model] == 0
        return [RequestOutput(model, [1], "x", done, None, 1, 1)] if done else []


def test_round_robin_gives_each_model_with_work_a_turn():
    engine = FakeEngine({"a": 3, "b": 0, "c": 2})
    policy = RoundRobinTurns(steps=2)
    turns = []
    while (turn := policy.next_turn(engine, {})) is not None:
        turns.append(turn)
        for _ in range(turn.steps):
            if engine.has_unfinished(turn.model):
                engine.step(turn.model)
    assert turns == [Turn("a", 2), Turn("c", 2), Turn("a", 2)]


def test_fifo_serves_the_oldest_request_model_first():
    engine = FakeEngine({"a": 1, "b": 1})
    assert FifoTurns().next_turn(engine, {"r1": "b", "r2": "a"}) == Turn("b", 1)
    assert FifoTurns().next_turn(engine, {}) is None


def test_a_cancelled_post_never_runs_and_the_worker_keeps_serving():
    engine = FakeEngine({"a": 0})
    outputs, ran = [], []
    worker = EngineWorker(engine, RoundRobinTurns(), lambda m, o: outputs.append(o), lambda m, e: None)
    gate = threading.Event()
    try:
        worker.post(lambda e: gate.wait(5))  # holds the engine thread
        cancelled = worker.post(lambda e: ran.append("cancelled"))
        assert cancelled.cancel()
        gate.set()
        assert worker.call(lambda e: "alive", timeout=5) == "alive"
        assert ran == []
        worker.call(lambda e: e.work.update(a=3), timeout=5)
        deadline = time.monotonic() + 5
        while not outputs and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.steps == ["a", "a", "a"] and outputs[0].finished
    finally:
        worker.close()


def test_an_error_in_a_callback_does_not_stop_the_worker():
    engine = FakeEngine({"a": 1})

    def broken(model, out):
        raise RuntimeError("callback bug")

    worker = EngineWorker(engine, RoundRobinTurns(), broken, lambda m, e: None)
    try:
        deadline = time.monotonic() + 5
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.call(lambda e: "alive", timeout=5) == "alive"
    finally:
        worker.close()
