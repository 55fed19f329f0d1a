"""The host model cache's capacity: one per cache folder, agreed by every process that uses it.

Each process builds its own HostModelCache over the node's folder, and each evicts to stay within
the capacity it was given. Processes given different capacities would evict for each other: the
smallest would empty the cache of models the others keep. So the capacity is the folder's,
recorded in its `.capacity` file (msgspec, bounded), which every user holds shared-locked for its
lifetime: the first user (nobody else holds the file) records what it was given; a later one that
asks for another capacity takes the recorded one and logs a warning naming both and the remedy.
Once every user has gone (a lock dies with its process), the next one records its own again.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Annotated

import msgspec

from .file_locks import flock_now

log = logging.getLogger(__name__)

CAPACITY_FILE = ".capacity"
MAX_FILE_BYTES = 4096


class CacheCapacity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    capacity_bytes: Annotated[int, msgspec.Meta(gt=0)]


_decoder = msgspec.msgpack.Decoder(CacheCapacity)


def join_capacity(root: Path, wanted: int) -> tuple[int, int]:
    """Become a user of the cache at root -> (the capacity its users share, an fd holding the shared
    lock that makes this process one; close it to leave). The caller holds the cache's registry lock,
    which every joiner takes: a first user's write and its lock's change from EX to SH are not seen
    half-done."""
    fd = os.open(root / CAPACITY_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        recorded = None if flock_now(fd) else _read(fd)  # EX had: the only user
        if recorded is None:  # the first user, or the others' record is unreadable: ours stands
            os.ftruncate(fd, 0)
            os.pwrite(fd, msgspec.msgpack.encode(CacheCapacity(wanted)), 0)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    if recorded is not None and recorded != wanted:
        log.warning("host model cache %s is in use by processes that gave it a capacity of %s; this "
                    "one asked for %s and uses theirs (one capacity per cache: give this process "
                    "the same size as the node's other services, or a cache of its own with "
                    "--host-cache-dir)", root, _mib(recorded), _mib(wanted))
    return (recorded or wanted), fd


def _read(fd: int) -> int | None:
    raw = os.pread(fd, MAX_FILE_BYTES + 1, 0)
    try:
        if len(raw) > MAX_FILE_BYTES:
            raise msgspec.ValidationError(f"more than {MAX_FILE_BYTES} bytes")
        return _decoder.decode(raw).capacity_bytes
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        log.warning("host model cache capacity file unreadable (%s); its users' capacity is unknown, "
                    "this process's stands", exc)
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.4g} MiB"
