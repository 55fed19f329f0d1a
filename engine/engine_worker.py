"""EngineWorker: the one thread that owns a MultiModelEngine, and the policy choosing its turns.

The engine is not thread-safe. Servers (gRPC handlers on an event loop) reach it only
through call() / post(), which run a function on the engine thread between steps; the
thread hands each step's outputs to a callback. Which model runs next, and for how many
steps, is a TurnPolicy: FIFO for a prefill instance, round-robin for a decode instance
(the Aegaeon schedulers plug in here later).

    loop:  run posted calls  ->  policy.next_turn()  ->  step(model) x n  ->  on_output(...)
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from .multi_model_engine import MultiModelEngine
from .request_book import RequestOutput
from .slab_allocator import KVPoolFullError

T = TypeVar("T")
log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5


@dataclass(frozen=True)
class Turn:
    model: str
    steps: int


class TurnPolicy(ABC):
    """Picks the next model to serve. arrivals: request id -> model, oldest first."""

    @abstractmethod
    def next_turn(self, engine: MultiModelEngine, arrivals: dict[str, str]) -> Turn | None:
        """None when no model has work."""


class RoundRobinTurns(TurnPolicy):
    """Every model with work in turn, `steps` steps each (plain co-location on a decode instance)."""

    def __init__(self, steps: int = 4) -> None:
        if steps < 1:
            raise ValueError(f"steps per turn must be >= 1, got {steps}")
        self.steps = steps
        self._last: str | None = None

    def next_turn(self, engine: MultiModelEngine, arrivals: dict[str, str]) -> Turn | None:
        names = list(engine.models)
        start = names.index(self._last) + 1 if self._last in names else 0
        for model in names[start:] + names[:start]:
            if engine.has_unfinished(model):
                self._last = model
                return Turn(model, self.steps)
        return None


class FifoTurns(TurnPolicy):
    """The model of the oldest request, one step at a time (a prefill instance's queue order)."""

    def next_turn(self, engine: MultiModelEngine, arrivals: dict[str, str]) -> Turn | None:
        for model in arrivals.values():
            if engine.has_unfinished(model):
                return Turn(model, 1)
        return None


class EngineWorker:
    """Runs the engine on its own thread.

    on_output(model, output) and on_failure(model, error) run on the engine thread, so they
    may use the engine (e.g. hand a prefilled sequence's KV on and abort it). A step that
    raises fails only its model's requests (on_failure); a KVPoolFullError on a switch just
    ends the turn: the active model keeps the device until the pool has room.
    """

    def __init__(self, engine: MultiModelEngine, policy: TurnPolicy,
                 on_output: Callable[[str, RequestOutput], None],
                 on_failure: Callable[[str, Exception], None], name: str = "engine") -> None:
        self.engine = engine
        self.policy = policy
        self.on_output = on_output
        self.on_failure = on_failure
        self.arrivals: dict[str, str] = {}  # request id -> model, in arrival order; engine thread only
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, fn: Callable[[MultiModelEngine], T]) -> Future:
        """Run fn(engine) on the engine thread before its next step; the future holds the result.
        Cancelling the future before fn started means fn never runs."""
        future: Future = Future()
        if self._stop.is_set():
            future.set_exception(RuntimeError("the engine worker has stopped"))
        else:
            self._inbox.put((fn, future))
        return future

    def call(self, fn: Callable[[MultiModelEngine], T], timeout: float | None = None) -> T:
        """post() and wait: the result, or fn's exception."""
        return self.post(fn).result(timeout)

    def track(self, request_id: str, model: str) -> None:
        """Note an arrival (engine thread, e.g. inside a posted fn) for FIFO policies."""
        self.arrivals[request_id] = model

    def forget(self, request_id: str) -> None:
        self.arrivals.pop(request_id, None)

    def close(self, timeout: float = 10) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_posted(block=not self.engine.has_unfinished())
                turn = self.policy.next_turn(self.engine, self.arrivals)
                if turn is not None:
                    self._serve(turn)
            except Exception:  # a bug in a callback must not silently stop the instance
                log.exception("engine worker %s: unexpected error; serving on", self._thread.name)
        self._run_posted(block=False)  # fail what arrived while stopping

    def _run_posted(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._execute(*item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _execute(self, fn: Callable, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up waiting (asyncio.wrap_future cancels): skip the work too
        if self._stop.is_set():
            future.set_exception(RuntimeError("the engine worker has stopped"))
            return
        try:
            future.set_result(fn(self.engine))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    def _serve(self, turn: Turn) -> None:
        for _ in range(turn.steps):
            try:
                outputs = self.engine.step(turn.model)
            except KVPoolFullError:
                return
            except Exception as exc:  # noqa: BLE001 - fail this model's requests, keep serving
                self.on_failure(turn.model, exc)
                return
            for out in outputs:
                if out.finished:
                    self.forget(out.request_id)
                self.on_output(turn.model, out)
            if not self.engine.has_unfinished(turn.model):
                return
