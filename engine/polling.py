"""poll(): retry something that must not block until it works or a time bound passes.

For locks a stopped or hung process may hold for good (the kernel drops a dead process's locks,
not a stopped one's): the host model cache's registry lock and the request table's byte ranges
are taken without blocking, and tried again with a doubling pause until their bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def poll(attempt: Callable[[], bool], timeout_s: float, pauses: tuple[float, float]) -> bool:
    """Call attempt() until it returns True -> True, or False once timeout_s has passed since the
    first call (made at once); the pause between calls doubles from pauses[0] up to pauses[1]."""
    deadline = time.monotonic() + timeout_s
    pause = pauses[0]
    while not attempt():
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, pauses[1])
    return True
