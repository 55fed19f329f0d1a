"""Dispatcher: which prefill and which decode instance a request goes to, per policy.

    aegaeon  prefill: grouped FCFS placement (join a same-model group with room, else the
             instance whose queued prefill time plus implied switches grows least);
             decode: join a same-model batch with room, else the instance with the fewest batches
    static   model i pinned to prefill instance i and decode instance i (no switching)
    request  decode: the instance already serving the model, else an idle one, else wait
             (FCFS) until one is idle: request-level scaling, head-of-line blocking included

The decode instance is chosen first and held for the request's whole life (its prefill
included), so `request` can make a request wait for an instance before anything runs.
Instances are anything with `name` and `load: InstanceLoad`.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tokenpool.engine.turn_policy import check_policy

from .grouped_fcfs import GroupedFcfsPlacement

MAX_BATCH = 64  # a decode batch's room: the engine's default max_num_seqs
DEFAULT_PREFILL_S_PER_TOKEN = 1e-4  # before any instance reported timings


@dataclass
class InstanceLoad:
    """Requests the proxy has in flight on one instance, per model."""

    by_model: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_model.values())

    def add(self, model: str) -> None:
        self.by_model[model] += 1

    def remove(self, model: str) -> None:
        """One request of model fewer; a model with none left is no longer on the instance."""
        self.by_model[model] -= 1
        if not self.by_model[model]:
            del self.by_model[model]

    @contextlib.contextmanager
    def hold(self, model: str) -> Iterator[None]:
        """Count a request on this instance while the block runs."""
        self.add(model)
        try:
            yield
        finally:
            self.remove(model)


class HasLoad(Protocol):
    name: str
    load: InstanceLoad


InstanceT = TypeVar("InstanceT", bound=HasLoad)


@dataclass(frozen=True)
class Timing:
    """Per model, as the instances profiled it: prefill seconds = a + b * tokens; switch seconds."""

    prefill_a: float
    prefill_b: float
    switch_s: float


def join_or_fewest_batches(model: str, instances: Sequence[InstanceT],
                           max_batch: int = MAX_BATCH) -> InstanceT:
    """Aegaeon's decode placement: the first instance whose batch of model has room, else the
    instance with the fewest batches (then the fewest requests)."""
    with_room = [i for i in instances if 0 < i.load.by_model[model] < max_batch]
    if with_room:
        return with_room[0]
    return min(instances, key=lambda i: (len(i.load.by_model), i.load.total))


def serving_or_idle(model: str, instances: Sequence[InstanceT]) -> InstanceT | None:
    """Request-level placement: the instance already serving model, else an idle one, else None."""
    serving = [i for i in instances if i.load.by_model[model] > 0]
    idle = [i for i in instances if i.load.total == 0]
    return (serving or idle or [None])[0]


class Dispatcher(ABC):
    pins_instances = False  # True: a model has its own instances, chosen by position in the full fleet

    def __init__(self) -> None:
        self.timings: dict[str, Timing] = {}  # filled from the instances' Status

    @abstractmethod
    def pick_prefill(self, request_id: str, model: str, num_tokens: int,
                     instances: Sequence[InstanceT]) -> InstanceT: ...

    def prefill_done(self, request_id: str) -> None:  # noqa: B027 - only grouped placement tracks it
        """The request's prefill ended (answered, failed or cancelled)."""

    @abstractmethod
    def decode_slot(self, model: str,
                    instances: Sequence[InstanceT]) -> contextlib.AbstractAsyncContextManager:
        """async with: the decode instance for the request, its load held until the block exits."""

    def prefill_seconds(self, model: str, num_tokens: int) -> float:
        t = self.timings.get(model)
        return t.prefill_a + t.prefill_b * num_tokens if t else DEFAULT_PREFILL_S_PER_TOKEN * num_tokens

    def switch_seconds(self, model: str) -> float:
        t = self.timings.get(model)
        return t.switch_s if t else 0.0


class AegaeonDispatcher(Dispatcher):
    def __init__(self, prefill_names: Sequence[str], max_batch: int = MAX_BATCH) -> None:
        super().__init__()
        self.placement = GroupedFcfsPlacement(prefill_names)
        self.max_batch = max_batch

    def pick_prefill(self, request_id, model, num_tokens, instances):
        name = self.placement.place(request_id, model, self.prefill_seconds(model, num_tokens),
                                    self.switch_seconds, among={i.name for i in instances})
        return next(i for i in instances if i.name == name)

    def prefill_done(self, request_id: str) -> None:
        self.placement.finished(request_id)

    @contextlib.asynccontextmanager
    async def decode_slot(self, model, instances) -> AsyncIterator:
        instance = join_or_fewest_batches(model, instances, self.max_batch)
        with instance.load.hold(model):
            yield instance


class StaticDispatcher(Dispatcher):
    """Model i of the catalogue on prefill instance i and decode instance i: nothing switches."""

    pins_instances = True

    def __init__(self, models: Sequence[str], num_prefill: int, num_decode: int) -> None:
        super().__init__()
        if len(models) > min(num_prefill, num_decode):
            raise ValueError(f"the static policy pins each model to its own instances: {len(models)} models "
                             f"need at least {len(models)} prefill and decode instances, got {num_prefill} "
                             f"prefill and {num_decode} decode")
        self.index = {m: i for i, m in enumerate(models)}

    def pick_prefill(self, request_id, model, num_tokens, instances):
        return instances[self.index[model]]

    @contextlib.asynccontextmanager
    async def decode_slot(self, model, instances) -> AsyncIterator:
        instance = instances[self.index[model]]
        with instance.load.hold(model):
            yield instance


class RequestLevelDispatcher(Dispatcher):
    """An instance serves one model at a time; a request for another model waits, first come
    first served, until some decode instance has no requests left."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: deque[tuple[str, asyncio.Future]] = deque()

    def pick_prefill(self, request_id, model, num_tokens, instances):
        return min(instances, key=lambda i: i.load.total)

    @contextlib.asynccontextmanager
    async def decode_slot(self, model, instances) -> AsyncIterator:
        instance = self._available(model, instances) if not self._waiting else None
        if instance is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting.append((model, future))
            try:
                instance = await future
            except asyncio.CancelledError:
                self._waiting = deque((m, f) for m, f in self._waiting if f is not future)
                if future.done() and not future.cancelled():  # handed an instance as we gave up
                    self._release(future.result(), model, instances)
                raise
        try:
            yield instance
        finally:
            self._release(instance, model, instances)

    @staticmethod
    def _available(model: str, instances: Sequence[InstanceT]) -> InstanceT | None:
        choice = serving_or_idle(model, instances)
        if choice is not None:
            choice.load.add(model)
        return choice

    def _release(self, instance: HasLoad, model: str, instances: Sequence[HasLoad]) -> None:
        instance.load.remove(model)
        self._wake(instances)

    def _wake(self, instances: Sequence[HasLoad]) -> None:
        """Hand free instances to waiters in arrival order; stop at the first that must wait on."""
        while self._waiting:
            model, future = self._waiting[0]
            if future.done():
                self._waiting.popleft()
                continue
            instance = self._available(model, instances)
            if instance is None:
                return
            self._waiting.popleft()
            future.set_result(instance)


def make_dispatcher(policy: str, models: Sequence[str], prefill_names: Sequence[str],
                    num_decode: int) -> Dispatcher:
    """ValueError naming the value for an unknown policy or a fleet the policy cannot use."""
    check_policy(policy)
    if policy == "static":
        return StaticDispatcher(models, len(prefill_names), num_decode)
    if policy == "request":
        return RequestLevelDispatcher()
    return AegaeonDispatcher(prefill_names)

