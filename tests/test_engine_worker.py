"""EngineWorker and the plain turn policies, over a fake engine (no model)."""

from __future__ import annotations

import threading
import time

from tokenpool.engine.engine_worker import EngineWorker
from tokenpool.engine.request_book import RequestOutput
from tokenpool.engine.turn_policy import RoundRobinTurns


class FakeEngine:
    """Each model has a count of steps left; step() records the model."""

    def __init__(self, work: dict[str, int]) -> None:
        self.models = dict.fromkeys(work)
        self.work = dict(work)
        self.steps: list[str] = []
        self.active = None
        self.loading: set[str] = set()  # models whose weights are still on their way from disk

    def weights_ready(self, model: str) -> bool:
        return model not in self.loading

    def weights_in_memory(self, model: str) -> bool:
        return model not in self.loading

    def has_unfinished(self, model: str | None = None) -> bool:
        return any(self.work[m] > 0 for m in ([model] if model else self.work))

    def switch_to(self, model: str, read_disk: bool = True) -> bool:
        self.active = model
        return True

    def step(self, model: str) -> list[RequestOutput]:
        assert model == self.active
        self.work[model] -= 1
        self.steps.append(model)
        done = self.work[model] == 0
        return [RequestOutput(model, [1], "x", done, None, 1, 1)] if done else []


class FakeRunner:
    """A TurnRunner over a FakeEngine, without a thread."""

    def __init__(self, engine: FakeEngine, arrivals=None) -> None:
        self.engine = engine
        self.arrivals = arrivals or {}

    def models_with_work(self):
        return [m for m in self.engine.models if self.engine.has_unfinished(m)]

    def has_work(self, model):
        return self.engine.has_unfinished(model)

    def activate(self, model):
        self.engine.switch_to(model)
        return True

    def step(self, model):
        return len(self.engine.step(model))


def test_round_robin_gives_each_model_with_work_a_turn_in_order():
    engine = FakeEngine({"a": 3, "b": 0, "c": 2})
    runner, policy = FakeRunner(engine), RoundRobinTurns(steps=2)
    while policy.run_turn(runner):
        pass
    assert engine.steps == ["a", "a", "c", "c", "a"]


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


def test_work_a_policy_holds_outside_the_engine_starts_without_waiting_for_a_post(monkeypatch):
    # A prefill queue holds its requests until their turn: the engine has nothing unfinished
    # between two of them. The worker must go straight on to the next turn, not sit in the
    # idle wait for a posted call (it did: 0.5 s lost after every prefill).
    from tokenpool.engine import engine_worker

    monkeypatch.setattr(engine_worker, "IDLE_WAIT_S", 30.0)
    engine = FakeEngine({"a": 0})
    started = []

    class QueuedStarts(RoundRobinTurns):
        def __init__(self, queued: int) -> None:
            super().__init__()
            self.queued = queued

        def run_turn(self, runner):
            if not runner.models_with_work() and self.queued:
                self.queued -= 1
                engine.work["a"] = 1  # the head of the queue goes into the engine
                started.append(time.monotonic())
            return super().run_turn(runner)

        def has_waiting(self):
            return self.queued > 0

    outputs = []
    worker = EngineWorker(engine, QueuedStarts(5), lambda m, o: outputs.append(o), lambda m, e: None)
    try:
        worker.post(lambda e: None)  # wake the idle worker once
        deadline = time.monotonic() + 10
        while len(outputs) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(outputs) == 5, f"{len(outputs)} of 5 queued requests ran in 10 s"
    finally:
        worker.close()


def test_a_prefill_instance_reports_its_queue_as_waiting_work():
    from tokenpool.prefill_svc.prefill_scheduler import PrefillQueue
    from tokenpool.prefill_svc.prefill_turns import GroupedFcfsTurns

    queue = PrefillQueue()
    turns = GroupedFcfsTurns(queue, start=lambda request_id: True)
    assert not turns.has_waiting()
    queue.add("r1", "a", 0.01)
    assert turns.has_waiting()
    queue.pop_next()
    assert not turns.has_waiting()


def test_a_turn_waiting_for_a_disk_load_runs_posted_calls_and_gives_up_a_model_left_without_work():
    """The only model with work is still loading: its turn waits for the load without holding
    posted calls (status, arrivals, cancellations) back; a model whose requests all went is
    given up, and so is the wait when work arrives for a model in memory (served first); once
    loaded, the model is stepped."""
    engine = FakeEngine({"cold": 2, "warm": 0})
    engine.loading.add("cold")
    outputs = []
    worker = EngineWorker(engine, RoundRobinTurns(), lambda m, o: outputs.append(o), lambda m, e: None)

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 5
        while not worker.call(condition, timeout=5):
            assert time.monotonic() < deadline, "not reached"
            time.sleep(0.01)

    try:
        for _ in range(3):  # each answered while the turn waits
            assert worker.call(lambda e: sorted(e.loading), timeout=5) == ["cold"]
        worker.call(lambda e: e.work.update(cold=0), timeout=5)  # its requests cancelled
        assert worker.call(lambda e: (e.active, e.steps), timeout=5) == (None, [])  # never switched to
        worker.call(lambda e: e.work.update(cold=2, warm=1), timeout=5)  # cold again, and warm arrives
        wait_for(lambda e: e.steps == ["warm"])
        worker.call(lambda e: e.loading.clear(), timeout=5)
        wait_for(lambda e: e.steps == ["warm", "cold", "cold"])
        assert len(outputs) == 2
    finally:
        worker.close()


class LoadingRunner(FakeRunner):
    """Models in `loading` are on disk: not ready (their load is started) until taken out."""

    def __init__(self, engine, loading) -> None:
        super().__init__(engine)
        self.loading = set(loading)
        self.asked: list[str] = []

    def ready(self, model):
        self.asked.append(model)
        return model not in self.loading

    def prefetch(self, model):
        pass


def test_grouped_fcfs_starts_a_model_in_memory_while_the_head_groups_model_loads():
    from tokenpool.prefill_svc.prefill_scheduler import PrefillQueue
    from tokenpool.prefill_svc.prefill_turns import GroupedFcfsTurns

    engine = FakeEngine({"cold": 0, "warm": 0})
    started = []

    def start(request_id):
        started.append(request_id)
        engine.work[request_id.split("-")[0]] += 1  # one prefill step each
        return True

    queue = PrefillQueue()
    for request_id in ("cold-1", "warm-1", "cold-2", "warm-2"):
        queue.add(request_id, request_id.split("-")[0], 0.01)
    runner, turns = LoadingRunner(engine, {"cold"}), GroupedFcfsTurns(queue, start)
    turns.run_turn(runner)
    turns.run_turn(runner)
    assert started == ["warm-1", "warm-2"] and "cold" in runner.asked  # its load was started
    runner.loading.clear()
    while turns.run_turn(runner):
        pass
    assert started == ["warm-1", "warm-2", "cold-1", "cold-2"]
    # Nothing in memory: the head goes, and its switch waits for the load.
    queue.add("cold-3", "cold", 0.01)
    runner.loading = {"cold"}
    turns.run_turn(runner)
    assert started[-1] == "cold-3" and engine.steps[-1] == "cold"


def test_a_started_prefill_waiting_for_room_lets_a_queued_group_in_memory_go_first():
    """A started request's model loads, its room held by a model kept cached for a queued group
    (the schedulers never evict a model with work): the turn must not wait for the load, which
    waits for that group. The group in memory goes first, its end frees the room, then the load
    ends (it waited 120 s for room, then failed, before)."""
    from tokenpool.prefill_svc.prefill_scheduler import PrefillQueue
    from tokenpool.prefill_svc.prefill_turns import GroupedFcfsTurns

    class RoomHeldEngine(FakeEngine):
        def weights_ready(self, model: str) -> bool:
            if model == "cold" and self.steps.count("warm") == 2:  # warm's queued work is done
                self.loading.discard("cold")
            return super().weights_ready(model)

    engine = RoomHeldEngine({"cold": 1, "warm": 0})  # cold's request is in the engine already
    engine.loading.add("cold")
    queue = PrefillQueue()
    for request_id in ("warm-1", "warm-2"):
        queue.add(request_id, "warm", 0.01)

    def start(request_id):
        engine.work["warm"] += 1
        return True

    outputs = []
    worker = EngineWorker(engine, GroupedFcfsTurns(queue, start), lambda m, o: outputs.append(m),
                          lambda m, e: None)
    try:
        worker.post(lambda e: None)  # wake the idle worker
        deadline = time.monotonic() + 10
        while len(outputs) < 3:
            assert time.monotonic() < deadline, f"stuck: steps {engine.steps}, queue {len(queue)}"
            time.sleep(0.01)
        assert engine.steps == ["warm", "warm", "cold"] and outputs == ["warm", "warm", "cold"]
    finally:
        worker.close()

