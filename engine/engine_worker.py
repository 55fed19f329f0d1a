"""EngineWorker: the one thread that owns a MultiModelEngine.

The engine is not thread-safe. Servers (gRPC handlers on an event loop) reach it only
through call() / post(), which run a function on the engine thread between steps; the
thread hands each step's outputs to a callback. Which model runs next, and for how long,
is the TurnPolicy's decision (engine/turn_policy.py); the worker is the live TurnRunner it
drives.

    loop:  run posted calls  ->  policy.run_turn(worker)  ->  activate / step ...  ->  on_output(...)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from .multi_model_engine import MultiModelEngine, SwitchRecord
from .request_book import RequestOutput
from .slab_allocator import KVPoolFullError
from .turn_policy import BatchInfo, TurnPolicy

T = TypeVar("T")
log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5
LOAD_POLL_S = 0.02  # a turn waiting for a disk load looks again this often, running posted calls


class WorkerObserver:
    """What the engine thread reports as it works (metrics, traces); every method runs on the
    engine thread, between steps, and must be quick. The base class ignores everything."""

    def turn_started(self) -> None:
        """The policy is about to run a turn (one per loop; an idle one does nothing)."""

    def switched(self, record: SwitchRecord) -> None:
        """activate() switched models."""

    def stepped(self, model: str, outputs: list[RequestOutput]) -> None:
        """One step of model ran and produced outputs."""

    def turn_ended(self) -> None:
        """The turn is over."""


class EngineWorker:
    """Runs the engine on its own thread, and is the live TurnRunner its policy drives.

    on_output(model, output) and on_failure(model, error) run on the engine thread, so they
    may use the engine (e.g. hand a prefilled sequence's KV on and abort it). A step that
    raises fails only its model's requests (on_failure); a KVPoolFullError on a switch just
    ends the turn: the active model keeps the device until the pool has room. Posted calls
    also run between the steps of a turn, so arrivals, cancellations and status calls never
    wait for a long quota to end.
    """

    def __init__(self, engine: MultiModelEngine, policy: TurnPolicy,
                 on_output: Callable[[str, RequestOutput], None],
                 on_failure: Callable[[str, Exception], None], name: str = "engine",
                 observers: tuple[WorkerObserver, ...] = ()) -> None:
        self.engine = engine
        self.observers = observers
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
        """Note an arrival (engine thread, e.g. in a posted fn) for arrival-order policies."""
        self.arrivals[request_id] = model

    def forget(self, request_id: str) -> None:
        self.arrivals.pop(request_id, None)

    def close(self, timeout: float = 10) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- TurnRunner ----------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def models_with_work(self) -> list[str]:
        return [m for m in self.engine.models if self.engine.has_unfinished(m)]

    def batch(self, model: str) -> BatchInfo:
        return self.engine.batch_info(model)

    def has_work(self, model: str) -> bool:
        return self.engine.has_unfinished(model)

    def ready(self, model: str) -> bool:
        return self.engine.weights_ready(model)

    def kv_landed_at(self, model: str) -> float | None:
        return self.engine.kv_landed_at(model)

    def activate(self, model: str) -> bool:
        # Its weights still on their way from disk (or waiting for host-cache room): posted calls
        # (arrivals, cancellations, status) run meanwhile. The turn is given up when the model's
        # requests all went, or when another model with work is in memory now (an arrival, or work
        # the policy holds, e.g. a queued prefill group): its work goes first, and may be what
        # frees the room this load waits for (the schedulers keep a model with work cached).
        while not self.engine.weights_ready(model):
            if self._stop.is_set() or not self.engine.has_unfinished(model) or self._other_work_ready(model):
                return False
            self._run_posted(block=True, timeout=LOAD_POLL_S)
        switches = self.engine.switches if self.observers else 0
        try:
            if not self.engine.switch_to(model, read_disk=False):
                return False  # its weights left the host cache meanwhile: their load runs now
        except KVPoolFullError:
            return False
        except Exception as exc:  # noqa: BLE001 - fail this model's requests, keep serving
            self.on_failure(model, exc)
            return False
        if self.observers and self.engine.switches != switches:
            for observer in self.observers:
                observer.switched(self.engine.last_switch)
        return True

    def _other_work_ready(self, model: str) -> bool:
        """Another model with work, started or held by the policy, has its weights in memory."""
        return (any(self.engine.weights_ready(m) for m in self.models_with_work() if m != model)
                or any(self.engine.weights_in_memory(m) for m in self.policy.waiting_models() if m != model))

    def prefetch(self, model: str) -> None:
        self.engine.prefetch(model)

    def step(self, model: str) -> int:
        self._run_posted(block=False)
        if not self.engine.has_unfinished(model):
            return 0
        try:
            outputs = self.engine.step(model)
        except KVPoolFullError:
            return 0
        except Exception as exc:  # noqa: BLE001 - fail this model's requests, keep serving
            self.on_failure(model, exc)
            return 0
        for observer in self.observers:
            observer.stepped(model, outputs)
        for out in outputs:
            if out.finished:
                self.forget(out.request_id)
            self.on_output(model, out)
        return len(outputs)

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_posted(block=not (self.engine.has_unfinished() or self.policy.has_waiting()))
                self._run_turn()
            except Exception:  # a bug in a callback must not silently stop the instance
                log.exception("engine worker %s: unexpected error; serving on", self._thread.name)
        self._run_posted(block=False)  # fail what arrived while stopping

    def _run_turn(self) -> None:
        if not self.observers:
            self.policy.run_turn(self)
            return
        for observer in self.observers:
            observer.turn_started()
        try:
            self.policy.run_turn(self)
        finally:
            for observer in self.observers:
                observer.turn_ended()

    def _run_posted(self, block: bool, timeout: float = IDLE_WAIT_S) -> None:
        try:
            item = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
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
