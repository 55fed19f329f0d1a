"""PrefillQueue: one prefill instance's grouped-FCFS queue (DESIGN.md "Prefill: grouped FCFS").

Requests of one model are grouped, at most `max_group_size` per group, so a model switch
is paid once per group rather than once per request. Groups run in order, one request at
a time (prefill is compute-bound); the model of the next group is what to prefetch.

    groups:   [ x: r1 r4 r5 ] [ y: r2 ] [ x: r3 ... ]   <- a new x request joins the
              ^ head: pop_next() -> r1                     first x group with room
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MAX_GROUP_SIZE = 8


@dataclass
class PrefillGroup:
    """Requests of one model that run back to back, in arrival order."""

    model: str
    request_ids: list[str] = field(default_factory=list)


class PrefillQueue:
    """One prefill instance's queue of same-model groups, run in order, one request at a time.

    A new request joins the FIRST group of its model that has room (not only the last
    group); otherwise a new group is appended.
    """

    def __init__(self, max_group_size: int = MAX_GROUP_SIZE) -> None:
        if max_group_size < 1:
            raise ValueError(f"max_group_size must be >= 1, got {max_group_size!r}")
        self.max_group_size = max_group_size
        self._groups: list[PrefillGroup] = []
        self._est_seconds: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._est_seconds)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._est_seconds

    def add(self, request_id: str, model: str, est_seconds: float) -> None:
        if request_id in self._est_seconds:
            raise ValueError(f"request {request_id!r} is already queued")
        if est_seconds < 0:
            raise ValueError(f"est_seconds must be >= 0, got {est_seconds!r}")
        group = self.group_with_room(model)
        if group is None:
            group = PrefillGroup(model)
            self._groups.append(group)
        group.request_ids.append(request_id)
        self._est_seconds[request_id] = est_seconds

    def group_with_room(self, model: str) -> PrefillGroup | None:
        """The first group of `model` that can take another request, if any."""
        for group in self._groups:
            if group.model == model and len(group.request_ids) < self.max_group_size:
                return group
        return None

    def remove(self, request_id: str) -> bool:
        """Drop a queued request (cancelled); False if it is not queued. An emptied group disappears."""
        if self._est_seconds.pop(request_id, None) is None:
            return False
        for i, group in enumerate(self._groups):
            if request_id in group.request_ids:
                group.request_ids.remove(request_id)
                if not group.request_ids:
                    del self._groups[i]
                break
        return True

    def peek_next(self) -> tuple[str, str] | None:
        """(request_id, model) that runs next, without taking it; None if the queue is empty."""
        if not self._groups:
            return None
        head = self._groups[0]
        return head.request_ids[0], head.model

    def pop_next(self) -> tuple[str, str] | None:
        """Take the head of the first group: (request_id, model); None if the queue is empty."""
        nxt = self.peek_next()
        if nxt is not None:
            self.remove(nxt[0])
        return nxt

    def pop_first(self, eligible: Callable[[str], bool]) -> tuple[str, str] | None:
        """Take the head of the first group whose model is eligible: (request_id, model); None if
        no group's is. eligible is asked once per group, in queue order, until one answers True."""
        group = next((g for g in self._groups if eligible(g.model)), None)
        if group is None:
            return None
        head = group.request_ids[0], group.model
        self.remove(head[0])
        return head

    def next_other_model(self, model: str) -> str | None:
        """The model of the first group whose model differs from `model`: what to prefetch."""
        return next((g.model for g in self._groups if g.model != model), None)

    def groups(self) -> list[PrefillGroup]:
        """A snapshot copy; changing it does not change the queue."""
        return [PrefillGroup(g.model, list(g.request_ids)) for g in self._groups]

    def load_seconds(self, active_model: str | None, switch_seconds: Callable[[str], float]) -> float:
        """Seconds until the queue drains: queued est_seconds plus one switch_seconds(m) per
        group whose model differs from the model before it (the first compared with active_model)."""
        models = [g.model for g in self._groups]
        return sum(self._est_seconds.values()) + _switch_cost(models, active_model, switch_seconds)

    def load_if_added(
        self,
        model: str,
        est_seconds: float,
        active_model: str | None,
        switch_seconds: Callable[[str], float],
    ) -> float:
        """load_seconds() as it would be after add(model, est_seconds); the queue is unchanged."""
        models = [g.model for g in self._groups]
        if self.group_with_room(model) is None:
            models.append(model)
        work = sum(self._est_seconds.values()) + est_seconds
        return work + _switch_cost(models, active_model, switch_seconds)


def _switch_cost(
    models: list[str], active_model: str | None, switch_seconds: Callable[[str], float]
) -> float:
    cost, previous = 0.0, active_model
    for model in models:
        if model != previous:
            cost += switch_seconds(model)
        previous = model
    return cost
