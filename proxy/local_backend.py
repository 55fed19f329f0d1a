"""LocalBackend: every registered model served by one in-process MultiModelEngine.

The engine is not thread-safe, so one engine thread owns it: the gRPC side hands
it submissions and cancellations through a queue, and it hands token outputs back
to each request's asyncio queue. Models with work are served round-robin, a few
steps per turn. (The disaggregated prefill/decode fleet replaces this backend; the
servicer does not change.)
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from tokenpool.engine.multi_model_engine import MultiModelEngine
from tokenpool.engine.request_book import RequestOutput
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.engine.sequence import Sequence
from tokenpool.engine.slab_allocator import KVPoolFullError

STEPS_PER_TURN = 4


@dataclass
class Submission:
    model: str
    prompt: list[int]
    sampling: SamplingParams
    outputs: asyncio.Queue  # RequestOutput items, then None; or an Exception
    loop: asyncio.AbstractEventLoop
    seq: Sequence | None = None
    accepted: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class BackendFullError(RuntimeError):
    """More requests are in flight than the backend admits; retry later."""


class LocalBackend:
    def __init__(self, engine: MultiModelEngine, max_in_flight: int = 256) -> None:
        self.engine = engine
        self.max_in_flight = max_in_flight
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[str, Submission] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, sub: Submission) -> Sequence:
        """Queue a request (blocking until the engine thread validated it); raises its error."""
        if len(self._live) >= self.max_in_flight:
            raise BackendFullError(f"{len(self._live)} requests in flight, the limit is {self.max_in_flight}")
        self._inbox.put(("submit", sub))
        sub.accepted.wait()
        if sub.error is not None:
            raise sub.error
        return sub.seq

    def cancel(self, model: str, request_id: str) -> None:
        self._inbox.put(("cancel", (model, request_id)))

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox(block=not self.engine.has_unfinished())
            for model in list(self.engine.models):
                if self.engine.has_unfinished(model):
                    self._serve(model)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                self._accept(payload)
            elif kind == "cancel":
                self._abort(*payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _accept(self, sub: Submission) -> None:
        try:
            sub.seq = self.engine.add_request(sub.model, sub.prompt, sub.sampling)
            self._live[sub.seq.request_id] = sub
        except Exception as exc:  # noqa: BLE001 - handed back to the submitting thread
            sub.error = exc
        sub.accepted.set()

    def _abort(self, model: str, request_id: str) -> None:
        sub = self._live.pop(request_id, None)
        if sub is not None and not sub.seq.is_finished:
            self.engine.abort(model, request_id)
            self._deliver(sub, None)

    def _serve(self, model: str) -> None:
        for _ in range(STEPS_PER_TURN):
            try:
                outputs = self.engine.step(model)
            except KVPoolFullError:
                return  # the active model keeps the device until its KV fits the pool; try later
            except Exception as exc:  # noqa: BLE001 - fail this model's requests, keep serving
                self._fail(model, exc)
                return
            for out in outputs:
                self._route(out)
            if not self.engine.has_unfinished(model):
                return

    def _route(self, out: RequestOutput) -> None:
        sub = self._live.get(out.request_id)
        if sub is None:
            return
        self._deliver(sub, out)
        if out.finished:
            del self._live[out.request_id]
            self._deliver(sub, None)

    def _fail(self, model: str, exc: Exception) -> None:
        for request_id, sub in list(self._live.items()):
            if sub.model == model:
                self.engine.abort(model, request_id)
                del self._live[request_id]
                self._deliver(sub, exc)

    @staticmethod
    def _deliver(sub: Submission, item) -> None:
        sub.loop.call_soon_threadsafe(sub.outputs.put_nowait, item)
