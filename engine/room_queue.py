"""RoomQueue: loads waiting for host-cache room, first come first served across processes.

A load that finds the cache's room held (by models in use or with work) waits and tries again.
Without a queue, the room that frees goes to whichever load asks first: smaller models, which
fit in less, keep taking it, and a large model waiting since before them can starve until its
wait runs out. So a waiting load takes a place in line, a file in the cache folder:

    wait-<pid>-<n>.wait   msgspec {model_id, nbytes, since_ns}, EX-locked by the waiting process

and every registration, in any process, counts the bytes of the live places ahead of its own
(all of them when it has none yet) as taken: it gets room only if there is room for those too.
Once the oldest waiter's room frees, only it fits; when it has registered (or given up, or died:
its lock dies with it and the next look removes the file), the next in line does. Loads for the
same model are not ahead of each other: whichever registers first, the others find it cached.

The trade: a waiter whose room never frees holds back every later load that does not fit beside
its reservation until its own wait ends (`--load-wait-s`), where before they went first.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec

from .file_locks import flock_now

MAX_RECORD_BYTES = 4096
_numbers = itertools.count()


class Waiter(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model_id: Annotated[str, msgspec.Meta(max_length=1024)]
    nbytes: Annotated[int, msgspec.Meta(ge=0)]
    since_ns: Annotated[int, msgspec.Meta(ge=0)]


_decoder = msgspec.msgpack.Decoder(Waiter)


@dataclass
class Place:
    """This process's place in line; leave() once registered or given up (idempotent)."""

    path: Path
    waiter: Waiter
    fd: int

    def leave(self) -> None:
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # the lock goes with it
            self.fd = -1


class RoomQueue:
    def __init__(self, root: Path) -> None:
        self.root = root

    def join(self, model_id: str, nbytes: int) -> Place:
        """Take a place at the end of the line. The caller holds the cache's registry lock, so no
        registration counts the line while the file is half-written."""
        waiter = Waiter(model_id, nbytes, time.time_ns())
        path = self.root / f"wait-{os.getpid()}-{next(_numbers)}.wait"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, msgspec.msgpack.encode(waiter))
        except BaseException:
            path.unlink(missing_ok=True)
            os.close(fd)
            raise
        return Place(path, waiter, fd)

    def ahead(self, model_id: str, place: Place | None) -> list[Waiter]:
        """The live waiters before `place` (all of them without one), other models' only. Removes
        the places of waiters that died. Registry lock held."""
        mine = place.path if place is not None else None
        out = []
        for path in self.root.glob("wait-*.wait"):
            if path == mine:
                continue
            waiter = self._live(path)
            if waiter is None or waiter.model_id == model_id:
                continue
            if place is None or (waiter.since_ns, path.name) < (place.waiter.since_ns, mine.name):
                out.append(waiter)
        return sorted(out, key=lambda w: w.since_ns)

    @staticmethod
    def _live(path: Path) -> Waiter | None:
        """The waiter whose place this is, or None (after removing it) when its process is gone
        or the record is not one (files here are written only by join, as this user)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            if flock_now(fd, shared=True):  # nobody holds it: a waiter that died
                path.unlink(missing_ok=True)
                return None
            raw = os.pread(fd, MAX_RECORD_BYTES + 1, 0)
            try:
                if len(raw) <= MAX_RECORD_BYTES:
                    return _decoder.decode(raw)
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass
            return None  # unreadable: counts for nothing (its owner removes it when it leaves)
        finally:
            os.close(fd)
