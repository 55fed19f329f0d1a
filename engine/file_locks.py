"""flock_now(): a file lock taken without waiting, for the host model cache's files (segments, the
registry lock, the capacity record, places in line for room). A lock dies with its process, so
"could not be had" means a live process holds it."""

from __future__ import annotations

import fcntl


def flock_now(fd: int, shared: bool = False) -> bool:
    """EX (or SH) on fd without waiting -> whether it was had."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
