"""wait_for(): poll a condition until it holds, failing the test once a bound has passed.

The bound is an upper limit for slow or busy machines, never a duration a test relies on: a fast
machine returns as soon as the condition holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], what: str = "the condition never held",
             timeout_s: float = 30.0, poll_s: float = 0.05) -> None:
    """Return once condition() is true; AssertionError(what) after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} (waited {timeout_s:.0f} s)"
        time.sleep(poll_s)
