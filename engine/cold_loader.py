"""ColdLoader: models read from disk into the host cache in the background, one load per model.

A request for a model that is only on disk asks for a load and gets a LoadTicket. Tickets
for the same model share one load (single flight). A ticket that no longer needs the
model cancels; when every ticket of a load has cancelled the load is abandoned between
two tensors, and HostModelCache.register removes its partial segment. Loads run on the
loader's own threads, never on an engine thread; progress() reports bytes read so far.

A load that finds the host cache full of models it may not evict (attached, or kept by the
schedulers for their queued work) waits for room instead of failing: that work ends and frees
it. It retries with backoff until the room is there, every waiter has cancelled, or
room_wait_s has passed (then its waiters get the CacheBusyError naming what holds the room).
A waiting load takes a place in the cache's line (engine/room_queue.py), across processes: a
later load, here or in another instance, gets room only beside what the earlier ones need, so a
large model is not starved by smaller ones taking each bit of room that frees. Two loads run at
once, so one waiting for room does not hold up another that fits beside its reservation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .host_model_cache import CacheBusyError, HostModelCache, TensorSpec

Fill = Callable[[str, torch.Tensor], None]
ROOM_WAIT_S = 120.0  # how long a load waits for host-cache room before its waiters get the error
ROOM_POLL_S = (0.01, 0.2)  # first and longest pause between tries for room
WORKERS = 2  # loads at once: one waiting for room does not hold up a smaller one that fits


class LoadAbandonedError(RuntimeError):
    """Every request waiting for this load was cancelled; its partial segment was removed."""


@dataclass(frozen=True)
class LoadProgress:
    model_id: str
    loaded_bytes: int
    total_bytes: int
    waiters: int
    waiting_for_room: bool = False


@dataclass
class _Load:
    model_id: str
    total_bytes: int
    future: Future = field(default_factory=Future)
    waiters: int = 1
    loaded_bytes: int = 0
    waiting_for_room: bool = False
    abandoned: threading.Event = field(default_factory=threading.Event)


class LoadTicket:
    """One waiter's claim on a load: wait() for it, or cancel() when no longer needed."""

    def __init__(self, loader: ColdLoader, load: _Load) -> None:
        self._loader = loader
        self._load = load
        self._cancelled = False

    @property
    def model_id(self) -> str:
        return self._load.model_id

    def done(self) -> bool:
        return self._load.future.done()

    def error(self) -> BaseException | None:
        """Why the load failed; None while it runs or when it succeeded."""
        return self._load.future.exception() if self._load.future.done() else None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the model is in the host cache; re-raises the load's error."""
        self._load.future.result(timeout)

    def cancel(self) -> None:
        """Give up this claim (idempotent); the last claim to go abandons an unfinished load."""
        if not self._cancelled:
            self._cancelled = True
            self._loader._release(self._load)


class ColdLoader:
    def __init__(self, cache: HostModelCache, workers: int = WORKERS,
                 room_wait_s: float = ROOM_WAIT_S) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if not room_wait_s >= 0:
            raise ValueError(f"room_wait_s must be non-negative, got {room_wait_s}")
        self.cache = cache
        self.room_wait_s = room_wait_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cold-load")
        self._lock = threading.Lock()
        self._loads: dict[str, _Load] = {}
        self.completed = 0  # loads that published a model
        self.abandoned = 0  # loads dropped because nobody waited any more

    def load(self, model_id: str, specs: Sequence[TensorSpec], fill: Fill,
             metadata: dict[str, str] | None = None) -> LoadTicket:
        """A ticket on the (new or running) load of model_id into the cache."""
        with self._lock:
            load = self._loads.get(model_id)
            if load is not None and not load.abandoned.is_set():
                load.waiters += 1
                return LoadTicket(self, load)
            # An abandoned load still running finishes first: register() waits for its writer.
            load = self._loads[model_id] = _Load(model_id, sum(s.nbytes for s in specs))
        self._pool.submit(self._run, load, specs, fill, metadata)
        return LoadTicket(self, load)

    def progress(self) -> list[LoadProgress]:
        with self._lock:
            return [LoadProgress(ld.model_id, ld.loaded_bytes, ld.total_bytes, ld.waiters,
                                 ld.waiting_for_room) for ld in self._loads.values()]

    def loading(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._loads

    def _release(self, load: _Load) -> None:
        with self._lock:
            load.waiters -= 1
            if load.waiters == 0 and not load.future.done():
                load.abandoned.set()

    def _run(self, load: _Load, specs: Sequence[TensorSpec], fill: Fill,
             metadata: dict[str, str] | None) -> None:
        def counted(name: str, dest: torch.Tensor) -> None:
            if load.abandoned.is_set():
                raise LoadAbandonedError(f"load of model {load.model_id!r} abandoned: every request "
                                         f"waiting for it was cancelled")
            load.waiting_for_room = False  # the room is claimed: reading now
            fill(name, dest)
            load.loaded_bytes += dest.nbytes

        try:
            self._register_when_room(load, specs, counted, metadata)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            self._finish(load, exc)
        else:
            self._finish(load, None)

    def _register_when_room(self, load: _Load, specs: Sequence[TensorSpec], fill: Fill,
                            metadata: dict[str, str] | None) -> None:
        """register(), tried again while the cache's room is held (CacheBusyError) and someone
        still waits, for at most room_wait_s."""
        give_up = time.monotonic() + self.room_wait_s
        pause = ROOM_POLL_S[0]
        place = None  # in line for room (engine/room_queue.py) from the first refusal on
        try:
            while True:
                try:
                    self.cache.register(load.model_id, specs, fill, metadata, place=place)
                    return
                except CacheBusyError as exc:
                    if time.monotonic() >= give_up:
                        raise CacheBusyError(f"{exc} (waited {self.room_wait_s:g} s for room)") from exc
                    load.waiting_for_room = True
                    place = place or self.cache.wait_in_line(load.model_id, specs)
                if load.abandoned.wait(pause):
                    raise LoadAbandonedError(f"load of model {load.model_id!r} abandoned while waiting for "
                                             f"host-cache room: every request waiting for it was cancelled")
                pause = min(2 * pause, ROOM_POLL_S[1])
        finally:
            if place is not None:
                place.leave()

    def _finish(self, load: _Load, exc: BaseException | None) -> None:
        with self._lock:
            if self._loads.get(load.model_id) is load:
                del self._loads[load.model_id]
            if isinstance(exc, LoadAbandonedError):
                self.abandoned += 1
            elif exc is None:
                self.completed += 1
        if exc is None:
            load.future.set_result(None)
        else:
            load.future.set_exception(exc)

    def close(self) -> None:
        with self._lock:
            for load in self._loads.values():
                load.abandoned.set()
        self._pool.shutdown(wait=True)
