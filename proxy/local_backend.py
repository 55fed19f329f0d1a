"""LocalBackend: every registered model served by one in-process MultiModelEngine.

The engine runs on an EngineWorker thread with round-robin turns between models that have
work; the gRPC side posts submissions and cancellations to it, and outputs come back to
each request's asyncio queue. (`tokenpool up` runs the disaggregated fleet instead:
FleetBackend; the servicer does not change.)
"""

from __future__ import annotations

import asyncio

from tokenpool.engine.engine_worker import EngineWorker
from tokenpool.engine.multi_model_engine import MultiModelEngine
from tokenpool.engine.request_book import RequestOutput
from tokenpool.engine.turn_policy import RoundRobinTurns

from .backend import Backend, BackendFullError, Submission


class LocalBackend(Backend):
    def __init__(self, engine: MultiModelEngine, max_in_flight: int = 256) -> None:
        self.engine = engine
        self.max_in_flight = max_in_flight
        self._live: dict[str, Submission] = {}  # touched on the engine thread only
        self.worker = EngineWorker(engine, RoundRobinTurns(), self._route, self._fail)

    async def submit(self, sub: Submission) -> None:
        sub.loop = asyncio.get_running_loop()
        await asyncio.wrap_future(self.worker.post(lambda engine: self._accept(engine, sub)))

    def cancel(self, sub: Submission) -> None:
        self.worker.post(lambda engine: self._abort(engine, sub))

    @property
    def in_flight(self) -> int:
        return len(self._live)

    async def close(self) -> None:
        self.worker.close()

    def _accept(self, engine: MultiModelEngine, sub: Submission) -> None:
        if len(self._live) >= self.max_in_flight:
            raise BackendFullError(f"{len(self._live)} requests in flight, the limit is {self.max_in_flight}")
        engine.add_request(sub.model, sub.prompt, sub.sampling, request_id=sub.request_id)
        self._live[sub.request_id] = sub

    def _abort(self, engine: MultiModelEngine, sub: Submission) -> None:
        if self._live.pop(sub.request_id, None) is not None:
            engine.abort(sub.model, sub.request_id)
            sub.deliver(None)

    def _route(self, model: str, out: RequestOutput) -> None:
        sub = self._live.get(out.request_id)
        if sub is None:
            return
        sub.deliver(out)
        if out.finished:
            del self._live[out.request_id]
            sub.deliver(None)

    def _fail(self, model: str, exc: Exception) -> None:
        for request_id, sub in list(self._live.items()):
            if sub.model == model:
                self.engine.abort(model, request_id)
                del self._live[request_id]
                sub.deliver(exc)
