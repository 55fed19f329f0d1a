"""StalledLockHolder: a process that takes a byte-range lock (lockf) on a file and stops itself
(SIGSTOP) holding it: what an instance stopped inside a request-table lock leaves behind. It is
started first and told the range afterwards, so the lock lands at the moment a test chooses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR)
start, length = map(int, sys.stdin.readline().split())
fcntl.lockf(fd, fcntl.LOCK_EX, length, start)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


class StalledLockHolder:
    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(path)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def lock(self, start: int, length: int) -> None:
        """Take [start, start + length) and stop, holding it; returns once it is held."""
        self.process.stdin.write(f"{start} {length}\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "locked"

    def kill(self) -> None:
        """Gone: the kernel drops its lock."""
        self.process.kill()
        self.process.communicate(timeout=10)
