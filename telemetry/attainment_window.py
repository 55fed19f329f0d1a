"""AttainmentWindow: mean SLO attainment per model over the requests that ended in the last
window_s seconds (the paper's per-request attainment, bench/metrics.py)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class AttainmentWindow:
    """Thread-safe: the event loop adds, the metrics endpoint's thread reads."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
        self.window_s = window_s
        self._clock = clock
        self._ended: deque[tuple[float, str, float]] = deque()  # (when, model, attainment)
        self._lock = threading.Lock()

    def add(self, model: str, attainment: float) -> None:
        if not 0.0 <= attainment <= 1.0:
            raise ValueError(f"attainment must lie in [0, 1], got {attainment!r}")
        with self._lock:
            self._ended.append((self._clock(), model, attainment))

    def means(self) -> dict[str, tuple[float, int]]:
        """model -> (mean attainment, requests) over the window; models without requests absent."""
        with self._lock:
            horizon = self._clock() - self.window_s
            while self._ended and self._ended[0][0] < horizon:
                self._ended.popleft()
            sums: dict[str, list[float]] = {}
            for _, model, value in self._ended:
                total = sums.setdefault(model, [0.0, 0])
                total[0] += value
                total[1] += 1
        return {m: (s / n, int(n)) for m, (s, n) in sums.items()}
