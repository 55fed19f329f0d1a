"""GroupedFcfsTurns: a prefill instance's turn policy over its PrefillQueue (DESIGN.md, grouped FCFS).

One request at a time (prefill is compute-bound): when the engine has nothing in flight,
the head of the first group starts (the servicer hands it to the engine); its model is
activated and the model of the next group that differs is prefetched; the turn steps until
the request's first token is out and its KV handed on. With max_group_size 1 the queue is
plain FCFS (the `request` and `static` baselines).

A group whose model is only on disk keeps its place while its load runs in the background:
the first group whose model needs no disk read starts instead, so a cold model does not hold
up the models in memory behind it. When every queued model is loading, the head starts and
its switch waits for its load; a group whose model is in memory (or comes to be) still goes
first meanwhile, beside the started request: the load may be waiting for room that only that
group's end frees (a model with queued work is never evicted).
"""

from __future__ import annotations

from collections.abc import Callable

from tokenpool.engine.turn_policy import TurnPolicy, TurnRunner

from .prefill_scheduler import PrefillQueue


class GroupedFcfsTurns(TurnPolicy):
    def __init__(self, queue: PrefillQueue, start: Callable[[str], bool]) -> None:
        """start(request_id) puts the request into the engine; False if it is gone (cancelled)."""
        self.queue = queue
        self.start = start

    def run_turn(self, runner: TurnRunner) -> bool:
        busy = runner.models_with_work()
        if busy:  # the request in flight (or several, if a caller batched) goes on, in memory first
            model = next((m for m in busy if runner.ready(m)), None)
            if model is None:  # all loading: a queued group in memory goes first, else wait
                model = self._start_next(runner, in_memory_only=True) or busy[0]
        else:
            model = self._start_next(runner)
            if model is None:
                return False
        if not runner.activate(model):
            return True
        following = self.queue.next_other_model(model)
        if following is not None:
            runner.prefetch(following)
        while runner.has_work(model):
            runner.step(model)
        return True

    def has_waiting(self) -> bool:
        return len(self.queue) > 0

    def waiting_models(self) -> list[str]:
        return list(dict.fromkeys(g.model for g in self.queue.groups()))

    def _start_next(self, runner: TurnRunner, in_memory_only: bool = False) -> str | None:
        """Start the first group's head whose model is in memory, else (unless in_memory_only) the
        head of the queue -> its model; None if nothing started."""
        while (head := self.queue.pop_first(runner.ready)
               or (None if in_memory_only else self.queue.pop_next())) is not None:
            request_id, model = head
            if self.start(request_id):
                return model
        return None
