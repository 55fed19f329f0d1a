"""GroupedFcfsPlacement: the proxy's choice of prefill instance (DESIGN.md "Prefill: grouped FCFS").

The proxy keeps a mirror of every prefill instance's PrefillQueue and applies the same
grouping rule, so it sends a request where the instance will group it: into an existing
same-model group with room if there is one, else to the instance whose queued work plus
implied switches grows least.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from tokenpool.prefill_svc.prefill_scheduler import MAX_GROUP_SIZE, PrefillQueue


class GroupedFcfsPlacement:
    """Mirrors each prefill instance's PrefillQueue, so the proxy places a request where the instance
    will group it."""

    def __init__(self, instances: Sequence[str], max_group_size: int = MAX_GROUP_SIZE) -> None:
        if not instances:
            raise ValueError("GroupedFcfsPlacement needs at least one prefill instance")
        if len(set(instances)) != len(instances):
            raise ValueError(f"prefill instance names must be unique, got {list(instances)!r}")
        self._queues = {name: PrefillQueue(max_group_size) for name in instances}
        self._active: dict[str, str | None] = dict.fromkeys(instances)
        self._instance_of: dict[str, str] = {}  # queued request -> instance
        self._model_of: dict[str, str] = {}

    def place(
        self, request_id: str, model: str, est_seconds: float, switch_seconds: Callable[[str], float],
        among: Collection[str] | None = None,
    ) -> str:
        """Choose the instance for a new request, record it in that mirror queue, and return its name.
        among: the instances that may take it (None: all; the proxy leaves out lost and draining ones)."""
        if request_id in self._model_of:
            raise ValueError(f"request {request_id!r} is already placed")
        names = [n for n in self._queues if among is None or n in among]
        if not names:
            raise ValueError("no prefill instance to place on")
        instance = self._instance_with_group(model, names)
        if instance is None:
            instance = self._least_loaded(model, est_seconds, switch_seconds, names)
        self._queues[instance].add(request_id, model, est_seconds)
        self._instance_of[request_id] = instance
        self._model_of[request_id] = model
        return instance

    def _instance_with_group(self, model: str, names: Sequence[str]) -> str | None:
        return next((name for name in names if self._queues[name].group_with_room(model)), None)

    def _least_loaded(self, model: str, est_seconds: float, switch_seconds: Callable[[str], float],
                      names: Sequence[str]) -> str:
        # min() keeps the first of equal loads: ties go to instance order.
        return min(
            names,
            key=lambda name: self._queues[name].load_if_added(
                model, est_seconds, self._active[name], switch_seconds
            ),
        )

    def started(self, request_id: str) -> None:
        """The instance began prefilling the request: it leaves the mirror queue and sets the active model."""
        instance = self._instance_of.pop(request_id, None)
        if instance is None:
            return
        self._queues[instance].remove(request_id)
        self._active[instance] = self._model_of[request_id]

    def finished(self, request_id: str) -> None:
        """Done or cancelled, queued or started: forget the request (idempotent)."""
        instance = self._instance_of.pop(request_id, None)
        if instance is not None:
            self._queues[instance].remove(request_id)
        self._model_of.pop(request_id, None)

    def queue(self, instance: str) -> PrefillQueue:
        return self._queues[instance]

    def active_model(self, instance: str) -> str | None:
        return self._active[instance]
