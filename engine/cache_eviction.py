"""Host-cache eviction informed by the schedulers: which cached models to drop for room.

Plain LRU (the host cache's fallback) evicts a model whose requests are queued the moment
before it is needed. The schedulers know better: a model with queued or running work, or
one a scheduler has announced as next (grouped FCFS's next group, the decode round's next
batch), is never a victim. Among the rest the expected cost of evicting a model is its
reload time weighted by how likely it is to be wanted soon; with no better forecast than
its idleness, that is

    cost = reload_seconds / (idle_seconds + 1)

so the victims are, first, models idle for longest and cheapest to read back from disk.
Victims are chosen by bytes (the shortfall), not by count.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class EvictionCandidate:
    """A cached model the cache could drop: its id and segment bytes."""

    model_id: str
    nbytes: int


class ModelActivity:
    """What the schedulers of this process know about each model, thread-safe.

    A scheduler calls arrived() when a request for a model is admitted, finished() when it
    leaves (done, aborted or handed off), and expect() when it knows a model is next.
    An engine that keeps its own queues passes has_work(model_id) instead and calls seen() on
    each arrival. reload_bytes_per_s is the disk read bandwidth reloads are costed at.
    """

    def __init__(self, reload_bytes_per_s: float = 1 << 30, clock: Callable[[], float] = time.monotonic,
                 has_work: Callable[[str], bool] | None = None) -> None:
        if not reload_bytes_per_s > 0:
            raise ValueError(f"reload_bytes_per_s must be positive, got {reload_bytes_per_s}")
        self.reload_bytes_per_s = reload_bytes_per_s
        self._clock = clock
        self._has_work = has_work
        self._lock = threading.Lock()
        self._work: dict[str, int] = {}  # model -> queued + running requests
        self._last_arrival: dict[str, float] = {}
        self._expected: set[str] = set()
        self.on_settled: Callable[[str], None] | None = None  # called after settled(), outside the lock

    def arrived(self, model_id: str) -> None:
        with self._lock:
            self._work[model_id] = self._work.get(model_id, 0) + 1
            self._last_arrival[model_id] = self._clock()
            self._expected.discard(model_id)

    def seen(self, model_id: str) -> None:
        """A request for model_id arrived (its work is counted by has_work)."""
        with self._lock:
            self._last_arrival[model_id] = self._clock()
            self._expected.discard(model_id)

    def finished(self, model_id: str) -> None:
        with self._lock:
            left = self._work.get(model_id, 0) - 1
            if left < 0:
                raise ValueError(f"model {model_id!r}: finished() without a matching arrived()")
            self._work[model_id] = left

    def expect(self, model_id: str) -> None:
        """A scheduler will run model_id next: keep it (and prefetch it, see wants_prefetch)."""
        with self._lock:
            self._expected.add(model_id)

    def unexpect(self, model_id: str) -> None:
        """The model is no longer wanted next (its requests went before it was switched to)."""
        with self._lock:
            self._expected.discard(model_id)

    def settled(self, model_id: str) -> None:
        """The expected model is resident now (its lease protects it from here on)."""
        with self._lock:
            self._expected.discard(model_id)
        if self.on_settled is not None:
            self.on_settled(model_id)

    def forget(self, model_id: str) -> None:
        """The model left the catalogue."""
        with self._lock:
            self._work.pop(model_id, None)
            self._last_arrival.pop(model_id, None)
            self._expected.discard(model_id)

    def busy(self, model_id: str) -> bool:
        with self._lock:
            if self._work.get(model_id, 0) > 0 or model_id in self._expected:
                return True
        return self._has_work is not None and self._has_work(model_id)

    def pending(self, model_id: str) -> int:
        with self._lock:
            return self._work.get(model_id, 0)

    def idle_seconds(self, model_id: str) -> float:
        """Seconds since the model's last arrival; infinite when it never had one."""
        with self._lock:
            last = self._last_arrival.get(model_id)
        return math.inf if last is None else max(0.0, self._clock() - last)

    def eviction_cost(self, candidate: EvictionCandidate) -> float:
        reload_s = candidate.nbytes / self.reload_bytes_per_s
        idle = self.idle_seconds(candidate.model_id)
        return 0.0 if math.isinf(idle) else reload_s / (idle + 1.0)

    def victim_order(self, candidates: Iterable[EvictionCandidate]) -> list[EvictionCandidate]:
        """Candidates the cache may evict, cheapest eviction first; busy and expected models left out."""
        free = [c for c in candidates if not self.busy(c.model_id)]
        return sorted(free, key=lambda c: (self.eviction_cost(c), -c.nbytes, c.model_id))
