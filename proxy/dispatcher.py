"""Dispatcher: which prefill and which decode instance a request goes to.

The policy seam of the proxy (the Aegaeon dispatch of grouped prefill and decode batches
replaces LeastLoadedDispatcher later). Instances are anything with a `load: InstanceLoad`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

# A decode instance that does not hold a model yet counts as this many requests busier:
# co-locating a model's requests avoids switches, yet a busy instance still sheds load.
COLOCATION_BONUS = 4


@dataclass
class InstanceLoad:
    """Requests the proxy has in flight on one instance, per model."""

    by_model: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_model.values())

    @contextlib.contextmanager
    def hold(self, model: str) -> Iterator[None]:
        """Count a request on this instance while the block runs."""
        self.by_model[model] += 1
        try:
            yield
        finally:
            self.by_model[model] -= 1
            if not self.by_model[model]:
                del self.by_model[model]


class HasLoad(Protocol):
    load: InstanceLoad


InstanceT = TypeVar("InstanceT", bound=HasLoad)


class Dispatcher(ABC):
    @abstractmethod
    def pick_prefill(self, model: str, instances: Sequence[InstanceT]) -> InstanceT: ...

    @abstractmethod
    def pick_decode(self, model: str, instances: Sequence[InstanceT]) -> InstanceT: ...


class LeastLoadedDispatcher(Dispatcher):
    """Prefill: the instance with the fewest requests (FIFO queues there). Decode: the fewest
    requests, counting an instance without the model as COLOCATION_BONUS busier."""

    def pick_prefill(self, model: str, instances: Sequence[InstanceT]) -> InstanceT:
        return min(instances, key=lambda i: i.load.total)

    def pick_decode(self, model: str, instances: Sequence[InstanceT]) -> InstanceT:
        def cost(instance: HasLoad) -> int:
            return instance.load.total + (0 if model in instance.load.by_model else COLOCATION_BONUS)
        return min(instances, key=cost)
