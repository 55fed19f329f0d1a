"""HostModelCache: registered models' weights as raw tensor blocks in shared memory.

Every process on the node maps the same segment files, so a model is loaded from disk
once and switching to it is a plain copy out of the page cache (DESIGN.md, "Memory
management"). No daemon: the files and the kernel's flocks are the whole protocol.

Files in the root folder (0700; files 0600):

    .registry.lock     flock EX around every create / publish / evict / attach step
    <key>.seg          the tensors, each at a 4096-byte aligned offset:
                       | t0 | pad | t1 | pad | ... | tN | pad |   (size: multiple of 4096)
    <key>.manifest     msgpack Manifest; its existence marks the model ready;
                       its mtime is the model's last use (for LRU across processes)
    <key>.manifest.tmp the manifest being published (renamed into place)

Locks on <key>.seg: a writer holds EX while registering; every lease (CachedModel)
holds SH; eviction needs EX without waiting. The kernel drops a dead process's flocks,
so a crashed writer leaves an unlocked segment without manifest (swept by the next
HostModelCache), and a killed reader never pins a model. A stopped one (SIGSTOP, a
debugger) keeps its locks, though: the registry lock is tried without blocking for
lock_timeout_s (a live holder keeps it for milliseconds), then CacheLockTimeout, so an
engine thread attaching a model fails its switch instead of hanging behind that process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import mmap
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import torch
from tqdm import tqdm

from .cache_capacity import join_capacity
from .cache_eviction import EvictionCandidate
from .file_locks import flock_now
from .polling import poll
from .private_shm import private_dir, reserve, shm_root
from .room_queue import Place, RoomQueue, Waiter

log = logging.getLogger(__name__)

REGISTRY_LOCK_TIMEOUT_S = 10.0  # then CacheLockTimeout
LOCK_PAUSE_S = (0.0005, 0.02)  # first and longest pause between tries of the registry lock
ALIGN = 4096  # tensor offsets and segment sizes: page-aligned, so DMA and vector loads never straddle
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
              torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
}


class CacheFullError(MemoryError):
    """A model does not fit in the cache even after evicting every unused model."""


class CacheBusyError(CacheFullError):
    """A model fits the cache's capacity, but the room is held now: by models attached by some
    process, kept by the schedulers (queued or expected work), or reserved by registrations in
    progress. It may free up as that work ends (cold_loader.py waits for it)."""


class CacheMissError(KeyError):
    """The model is not registered (or is still being registered)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class ModelInUseError(RuntimeError):
    """The model is attached by some process, so it cannot be evicted."""


class CorruptManifestError(ValueError):
    """A manifest (or its segment) in shared memory is malformed; nothing was mapped."""


class CacheLockTimeout(TimeoutError):
    """The registry lock stayed held far longer than a live holder keeps it: a process stopped or
    hung inside it. Nothing was changed; it frees when that process runs again or dies."""


class ModelConflictError(ValueError):
    """The id is already registered with a different tensor layout or size."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to cache: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def like(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, tensor.dtype, tuple(tensor.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class CachedModelInfo:
    model_id: str
    nbytes: int
    in_use: bool
    last_used: float  # seconds since the epoch


VictimOrder = Callable[[list[EvictionCandidate]], list[EvictionCandidate]]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class TensorEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    dtype: str
    shape: list[NonNegative]
    offset: NonNegative
    nbytes: NonNegative


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model_id: str
    tensors: list[TensorEntry]
    total_bytes: NonNegative
    metadata: dict[str, str]
    created_at: float
    format_version: int = FORMAT_VERSION


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Manifest)


def default_root() -> Path:
    """/dev/shm/tokenpool-<uid>/models, or the same under the temp folder without /dev/shm."""
    return shm_root() / "models"


@dataclass
class CacheCounters:
    """What this process's HostModelCache did (for metrics): a registration or attach that
    found the model cached is a hit, one that had to read the checkpoint (or found nothing to
    attach) a miss; evictions are models removed to make room."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class HostModelCache:
    """Models' weights in shared memory, bounded by capacity_bytes, evicted when unused
    (least recently used first, or in victim_order's order).

    Any number of processes may construct one over the same root and use it at once; they share
    one capacity (engine/cache_capacity.py: the first user's, while any user remains).
    """

    def __init__(self, root: Path | None = None, capacity_bytes: int = 8 << 30,
                 progress: bool = True, victim_order: VictimOrder | None = None) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if root is None:
            private_dir(default_root().parent)
        self.root = private_dir(Path(root) if root is not None else default_root())
        self._user_fd = -1  # so __del__ of a half-built cache closes nothing
        self.room_queue = RoomQueue(self.root)  # loads waiting for room, first come first served
        self.progress = progress
        self.counters = CacheCounters()
        # None: least recently used first. Else (engine/cache_eviction.py) the schedulers' order,
        # which may leave out models it wants kept; unlisted models are never evicted for room.
        self.victim_order = victim_order
        # Given an entry's metadata and a registration's, whether the registration replaces the entry
        # (when no process has it attached): model_switcher.stale_entry (an older tokenpool's layout,
        # another checkpoint). None: an entry of the same layout is the registration's, one of
        # another layout a ModelConflictError.
        self.replaces: Callable[[dict[str, str], dict[str, str]], bool] | None = None
        self.lock_timeout_s = REGISTRY_LOCK_TIMEOUT_S
        with self._registry_lock():
            self._sweep_crashed()
            # The folder's, agreed by its users (engine/cache_capacity.py); held until close().
            self._capacity, self._user_fd = join_capacity(self.root, capacity_bytes)

    def close(self) -> None:
        """Stop being one of the cache's users (what is cached stays); idempotent."""
        fd, self._user_fd = getattr(self, "_user_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes of all segments, ready or being registered (a registration reserves its size)."""
        return sum(_size_or_zero(p) for p in self.root.glob("*.seg"))

    # ---- register -------------------------------------------------------------------------------

    def register(self, model_id: str, specs: Sequence[TensorSpec], fill: Callable[[str, torch.Tensor], None],
                 metadata: dict[str, str] | None = None, place: Place | None = None) -> None:
        """Cache a model: fill(name, dest) copies each tensor into `dest`, a view into shared memory.

        Idempotent for an id already registered with the same layout and not stale by `replaces`; a
        stale one, or one of another layout, is replaced if `replaces` says it is stale and nobody
        has it attached, else ModelConflictError.
        Waits for another process registering the same id. Evicts least-recently used unattached
        models to make room, else raises CacheBusyError (the room is held for now) or
        CacheFullError (more than the capacity) and changes nothing. The room counted as free
        leaves out what loads waiting in line before this one need (engine/room_queue.py); place:
        this registration's own place in that line (wait_in_line), left once its room is claimed.
        If fill raises, nothing is left behind.
        """
        entries, total = _plan_layout(specs)
        metadata = _check_metadata(metadata or {})
        fd = self._claim(model_id, entries, total, metadata, place)
        if fd is None:
            return
        try:
            self._fill_segment(fd, model_id, specs, entries, total, fill)
            self._publish(fd, Manifest(model_id, entries, total, metadata, time.time()))
        except BaseException:
            self._abandon(fd, model_id)
            raise
        finally:
            os.close(fd)

    def wait_in_line(self, model_id: str, specs: Sequence[TensorSpec]) -> Place:
        """A place in line for room, for a registration refused CacheBusyError that will try again:
        later registrations leave it room. Leave it when done (register leaves it on success)."""
        with self._registry_lock():
            return self.room_queue.join(model_id, _plan_layout(specs)[1])

    def forget_stale(self, model_id: str, specs: Sequence[TensorSpec], metadata: dict[str, str]) -> None:
        """For a registration put off until its weights are needed (a catalogue's): remove now the
        cached entry of model_id that it would replace (register's rules), so that nothing reads
        that entry's weights for it meanwhile; ModelConflictError where a process has it attached."""
        entries, total = _plan_layout(specs)
        with self._registry_lock():
            self._keeps(model_id, entries, total, _check_metadata(metadata))

    def _keeps(self, model_id: str, entries: list[TensorEntry], total: int, metadata: dict[str, str]) -> bool:
        """Whether the cached entry of model_id is what a registration of (entries, metadata) would
        write; False too where there is none, or there was a stale one, now removed; ModelConflictError
        where it cannot be replaced. Registry lock held."""
        key = _file_key(model_id)
        if not self._manifest(key).exists():
            return False
        old = self._read_manifest(model_id)
        same_layout = old.total_bytes == total and _layout(old.tensors) == _layout(entries)
        if same_layout and not (self.replaces is not None and self.replaces(old.metadata, metadata)):
            return True
        self._replace_stale(old, key, same_layout, entries, total, metadata)
        return False

    def _claim(self, model_id: str, entries: list[TensorEntry], total: int, metadata: dict[str, str],
               place: Place | None) -> int | None:
        """None if already registered; else the new segment's fd, EX-locked, its room reserved."""
        key = _file_key(model_id)
        while True:
            with self._registry_lock():
                self._sweep_crashed()
                if self._keeps(model_id, entries, total, metadata):
                    self.counters.hits += 1
                    return None
                busy = _open_existing(self._segment(key))  # left by _sweep_crashed: a live writer's
                if busy is None:
                    self._make_room(model_id, total, place)
                    self.counters.misses += 1
                    fd = self._create_segment(key, total)
                    if place is not None:
                        place.leave()  # the segment holds the room now
                    return fd
            _wait_for_writer(busy)

    def _create_segment(self, key: str, total: int) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self._segment(key), flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, total)  # st_size is the reservation used_bytes counts
        except BaseException:
            self._segment(key).unlink()
            os.close(fd)
            raise
        return fd

    def _fill_segment(self, fd: int, model_id: str, specs: Sequence[TensorSpec], entries: list[TensorEntry],
                      total: int, fill: Callable[[str, torch.Tensor], None]) -> None:
        _allocate(fd, total, model_id)
        mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"caching {model_id}",
                  disable=not self.progress) as bar:
            for spec, entry in zip(specs, entries, strict=True):
                fill(spec.name, _view(mm, entry, spec.dtype))
                bar.update(entry.nbytes)
        # mm is not closed: views the caller kept would point at unmapped memory; GC unmaps it.

    def _publish(self, fd: int, manifest: Manifest) -> None:
        """Write the manifest atomically; from then on the model is ready and the writer lock goes."""
        key = _file_key(manifest.model_id)
        tmp = self.root / f"{key}.manifest.tmp"
        with self._registry_lock():
            _write_private(tmp, _encoder.encode(manifest))
            now = time.time_ns()  # explicit: file times tick coarsely (~4 ms), too coarse for LRU order
            os.utime(tmp, ns=(now, now))
            os.rename(tmp, self._manifest(key))
            # Unlock explicitly, inside the registry lock: an attach must never find the manifest
            # while EX is held, and the mmap's dup of the fd (alive while any view is) would keep it.
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _abandon(self, fd: int, model_id: str) -> None:
        key = _file_key(model_id)
        with self._registry_lock():
            for path in (self._manifest(key), self.root / f"{key}.manifest.tmp", self._segment(key)):
                path.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)  # wakes a process waiting to register the same id

    def _replace_stale(self, old: Manifest, key: str, same_layout: bool, entries: list[TensorEntry],
                       total: int, metadata: dict[str, str]) -> None:
        """Remove an entry that `replaces` accepts as stale for this registration (an older
        tokenpool's layout, another checkpoint) and no process has attached, so it is registered
        anew; else ModelConflictError. Registry lock held."""
        model_id = old.model_id
        if same_layout:
            why = (f"another checkpoint's copy (read from {old.metadata.get('folder', '?')}; this "
                   f"registration reads {metadata.get('folder', '?')})")
        else:
            why = "in an older tokenpool's layout"
        remedy = (f"evict it first (`tokenpool models evict {model_id} --server PROXY`, or with no "
                  f"instance running on this node, remove {self.root})")
        if self.replaces is None or not self.replaces(old.metadata, metadata):
            raise ModelConflictError(f"model {model_id!r} is already registered with {old.total_bytes} "
                                     f"bytes in {len(old.tensors)} tensors; this registration has {total} "
                                     f"bytes in {len(entries)} tensors with a different layout (another "
                                     f"dtype?): {remedy}")
        fd = _try_lock_exclusive(self._segment(key))
        if fd is None:
            raise ModelConflictError(f"model {model_id!r} in the host cache is {why}, still attached by a "
                                     f"running process: serve this checkpoint under another id, or give "
                                     f"this process a host cache of its own (`tokenpool up --host-cache-dir "
                                     f"DIR`), or remove the id from that process and {remedy}")
        try:
            self._remove_files(key)
        finally:
            os.close(fd)
        self.counters.evictions += 1
        log.warning("host cache: replacing model %r, %s", model_id, why)

    # ---- capacity -------------------------------------------------------------------------------

    def _make_room(self, model_id: str, need: int, place: Place | None = None) -> None:
        """Evict LRU unattached models until `need` bytes fit beside what the loads in line before
        this one need: all or nothing. Registry lock held."""
        if need > self._capacity:
            raise CacheFullError(f"model {model_id!r} needs {need} bytes, more than the cache's whole "
                                 f"capacity of {self._capacity} bytes")
        ahead = self.room_queue.ahead(model_id, place)
        shortfall = need + sum(w.nbytes for w in ahead) - (self._capacity - self.used_bytes)
        if shortfall <= 0:
            return
        victims, in_use = self._lock_victims(shortfall)
        try:
            if sum(v.nbytes for v, _ in victims) < shortfall:
                raise CacheBusyError(self._full_message(model_id, need, in_use, ahead))
            for victim, _ in victims:
                self._remove_files(victim.key)
                self.counters.evictions += 1
        finally:
            for _, fd in victims:
                os.close(fd)

    def _lock_victims(self, shortfall: int) -> tuple[list[tuple[_Entry, int]], list[_Entry]]:
        """Least recently used first, EX-lock unattached models until they cover `shortfall`."""
        victims: list[tuple[_Entry, int]] = []
        in_use: list[_Entry] = []
        freed = 0
        for entry in self._victim_candidates():
            fd = _try_lock_exclusive(self._segment(entry.key))
            if fd is None:
                in_use.append(entry)
            elif freed < shortfall:
                victims.append((entry, fd))
                freed += entry.nbytes
            else:
                os.close(fd)
        return victims, in_use

    def _victim_candidates(self) -> list[_Entry]:
        lru = sorted(self._catalog(), key=lambda e: (e.last_used_ns, e.key))
        if self.victim_order is None:
            return lru
        by_id = {e.model_id: e for e in lru}
        ordered = self.victim_order([EvictionCandidate(e.model_id, e.nbytes) for e in lru])
        return [by_id[c.model_id] for c in ordered if c.model_id in by_id]

    def _full_message(self, model_id: str, need: int, in_use: list[_Entry],
                      ahead: Sequence[Waiter] = ()) -> str:
        catalog = self._catalog()
        ready = sum(e.nbytes for e in catalog)
        pending = self.used_bytes - ready
        held = ", ".join(f"{e.model_id!r} ({e.nbytes} bytes)" for e in in_use) or "none"
        offered = {e.key for e in self._victim_candidates()}
        kept = ", ".join(f"{e.model_id!r} ({e.nbytes} bytes)" for e in catalog if e.key not in offered)
        return (f"cache full: model {model_id!r} needs {need} bytes; capacity {self._capacity}, "
                f"used {self.used_bytes} ({pending} by registrations in progress); "
                f"models in use, which cannot be evicted: {held}"
                + (f"; kept by the schedulers for queued or expected work: {kept}" if kept else "")
                + (f"; left for loads waiting since before this one: "
                   f"{', '.join(f'{w.model_id!r} ({w.nbytes} bytes)' for w in ahead)}" if ahead else ""))

    # ---- attach / list / evict ------------------------------------------------------------------

    def attach(self, model_id: str) -> CachedModel:
        """Map a registered model read-shared; the lease pins it (no eviction) until close()."""
        key = _file_key(model_id)
        with self._registry_lock():
            if not self._manifest(key).exists():
                self.counters.misses += 1
                raise CacheMissError(f"model {model_id!r} is not in the host model cache at {self.root}")
            manifest = self._read_manifest(model_id)
            fd = _open_existing(self._segment(key))
            if fd is None:
                raise CorruptManifestError(f"model {model_id!r} has a manifest but no segment file")
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only evict/sweep take EX, under this same lock
            self.counters.hits += 1
            now = time.time_ns()
            os.utime(self._manifest(key), ns=(now, now))
        try:
            return CachedModel(fd, manifest)
        except BaseException:
            os.close(fd)
            raise

    def contains(self, model_id: str) -> bool:
        """The model is ready in the cache (a hint: another process may evict it right after)."""
        return self._manifest(_file_key(model_id)).exists()

    def list(self) -> list[CachedModelInfo]:
        """Ready models, least recently used first."""
        with self._registry_lock():
            out = []
            for entry in sorted(self._catalog(), key=lambda e: e.last_used_ns):
                fd = _try_lock_exclusive(self._segment(entry.key))
                if fd is not None:
                    os.close(fd)
                in_use = fd is None
                out.append(CachedModelInfo(entry.model_id, entry.nbytes, in_use, entry.last_used_ns / 1e9))
            return out

    def evict(self, model_id: str) -> None:
        """Remove a model; ModelInUseError if any process has it attached. Works on corrupt manifests."""
        key = _file_key(model_id)
        with self._registry_lock():
            if not self._manifest(key).exists():
                raise CacheMissError(f"model {model_id!r} is not in the host model cache at {self.root}")
            if not self._segment(key).exists():  # a broken entry: nothing can be attached to it
                self._remove_files(key)
                return
            fd = _try_lock_exclusive(self._segment(key))
            if fd is None:
                raise ModelInUseError(f"model {model_id!r} is attached by a process; close its leases first")
            try:
                self._remove_files(key)
            finally:
                os.close(fd)

    # ---- files ----------------------------------------------------------------------------------

    def _segment(self, key: str) -> Path:
        return self.root / f"{key}.seg"

    def _manifest(self, key: str) -> Path:
        return self.root / f"{key}.manifest"

    @contextlib.contextmanager
    def _registry_lock(self) -> Iterator[None]:
        fd = os.open(self.root / ".registry.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if not poll(lambda: flock_now(fd), self.lock_timeout_s, LOCK_PAUSE_S):
                raise CacheLockTimeout(
                    f"host model cache {self.root}: its registry lock stayed held for "
                    f"{self.lock_timeout_s:g} s by a process that does not let go of it (stopped "
                    f"or hung?); nothing was changed")
            yield
        finally:
            os.close(fd)

    def _remove_files(self, key: str) -> None:
        # Manifest first: a crash in between leaves an unlocked segment without one, which the sweep removes.
        self._manifest(key).unlink(missing_ok=True)
        self._segment(key).unlink(missing_ok=True)

    def _sweep_crashed(self) -> None:
        """Remove what dead writers left: unlocked segments without manifest. Registry lock held."""
        for tmp in self.root.glob("*.manifest.tmp"):  # publishing happens under the registry lock
            tmp.unlink(missing_ok=True)
        for manifest in self.root.glob("*.manifest"):  # segment gone: unusable, and invisible to list()
            if not manifest.with_suffix(".seg").exists():
                manifest.unlink()
        for seg in self.root.glob("*.seg"):
            if seg.with_suffix(".manifest").exists():
                continue
            fd = _try_lock_exclusive(seg)
            if fd is not None:  # no live writer holds it
                seg.unlink()
                os.close(fd)

    def _catalog(self) -> list[_Entry]:
        entries = []
        for path in self.root.glob("*.manifest"):
            key = path.name.removesuffix(".manifest")
            with contextlib.suppress(FileNotFoundError):
                entries.append(_Entry(key, self._id_for(key, path), self._segment(key).stat().st_size,
                                      path.stat().st_mtime_ns))
        return entries

    def _id_for(self, key: str, path: Path) -> str:
        """The manifest's model id; a corrupt manifest is listed (and evictable by LRU) under its key."""
        try:
            return _decoder.decode(path.read_bytes()).model_id
        except (msgspec.DecodeError, msgspec.ValidationError):
            return f"<corrupt manifest {key}>"

    def _read_manifest(self, model_id: str) -> Manifest:
        path = self._manifest(_file_key(model_id))
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise CorruptManifestError(f"model {model_id!r}: manifest {path} is {size} bytes, "
                                       f"more than the {MAX_MANIFEST_BYTES} allowed")
        try:
            manifest = _decoder.decode(path.read_bytes())
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise CorruptManifestError(f"model {model_id!r}: corrupt manifest {path}: {e}") from e
        if manifest.model_id != model_id:
            raise CorruptManifestError(f"model {model_id!r}: manifest {path} names {manifest.model_id!r}")
        if manifest.format_version != FORMAT_VERSION:
            raise CorruptManifestError(f"model {model_id!r}: manifest format {manifest.format_version}, "
                                       f"this code reads {FORMAT_VERSION}")
        return manifest


@dataclass(frozen=True)
class _Entry:
    key: str
    model_id: str
    nbytes: int
    last_used_ns: int


class CachedModel:
    """A lease on a cached model: zero-copy tensor views into the shared segment.

    Views are read-only by convention (writes are seen by every process). While the lease
    is open the model cannot be evicted. close() (or leaving the `with` block) ends the
    lease; views kept past it stay valid (the mapping lives until the last view is gone)
    but no longer stop an eviction.
    """

    def __init__(self, fd: int, manifest: Manifest) -> None:
        """Takes over `fd` (SH-locked) only on success; on error the caller still owns it."""
        self._fd = -1  # so __del__ of a half-built lease never closes the caller's fd
        self._pinned_ptr: int | None = None
        self._mm: mmap.mmap | None = None
        self.model_id = manifest.model_id
        self.metadata = dict(manifest.metadata)
        self.nbytes = manifest.total_bytes
        size = os.fstat(fd).st_size
        _check_bounds(manifest, size)
        # One mapping per lease; MAP_SHARED so every process sees the same pages.
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) if size else None
        # The whole segment as bytes: tensors sit at their manifest offsets in it, so a
        # consumer that keeps the same layout moves a model with one copy.
        empty = torch.empty(0, dtype=torch.uint8)
        self.raw = torch.frombuffer(self._mm, dtype=torch.uint8) if size else empty
        # name -> (dtype, shape, byte offset in raw): what a consumer of raw needs, made cheaply;
        # the tensors themselves (a view each: ~7 µs, 1.3 ms for SmolLM2) only when asked for.
        self.layout: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {
            e.name: (_DTYPES[e.dtype], tuple(e.shape), e.offset) for e in manifest.tensors
        }
        self._entries = manifest.tensors
        self._tensors: dict[str, torch.Tensor] | None = None
        self._fd = fd

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """name -> a view of the tensor in the segment (made on first use; empty once closed)."""
        if self._tensors is None:
            self._tensors = {} if self._mm is None else {
                e.name: _view(self._mm, e, _DTYPES[e.dtype]) for e in self._entries}
        return self._tensors

    def pin_for_cuda(self) -> bool:
        """CUDA hook: page-lock this mapping so host-to-device copies DMA straight from it.

        Returns False (a no-op) without CUDA. Unpinned again by close().
        """
        if self._pinned_ptr is not None or self._mm is None or not torch.cuda.is_available():
            return False
        ptr = torch.frombuffer(self._mm, dtype=torch.uint8).data_ptr()
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(ptr, len(self._mm), 0))
        self._pinned_ptr = ptr
        return True

    def close(self) -> None:
        """End the lease (idempotent). The mapping is unmapped by GC once no view refers to it."""
        if self._fd < 0:
            return
        if self._pinned_ptr is not None:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self._pinned_ptr))
            self._pinned_ptr = None
        fcntl.flock(self._fd, fcntl.LOCK_UN)  # explicit: the mmap's dup of the fd would keep the lock
        os.close(self._fd)
        self._fd = -1
        self._tensors = {}
        self.raw = torch.empty(0, dtype=torch.uint8)
        self._mm = None

    def __enter__(self) -> CachedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# ---- helpers ----------------------------------------------------------------------------------


def _plan_layout(specs: Sequence[TensorSpec]) -> tuple[list[TensorEntry], int]:
    """Manifest entries at ALIGN-ed offsets, and the segment size (a multiple of ALIGN, at least one)."""
    entries, cursor, names = [], 0, set()
    for spec in specs:
        _check_spec(spec, names)
        names.add(spec.name)
        offset = _round_up(cursor, ALIGN)
        dtype = str(spec.dtype).removeprefix("torch.")
        entries.append(TensorEntry(spec.name, dtype, list(spec.shape), offset, spec.nbytes))
        cursor = offset + spec.nbytes
    return entries, max(_round_up(cursor, ALIGN), ALIGN)


def _check_spec(spec: TensorSpec, seen: set[str]) -> None:
    if not isinstance(spec.name, str) or not spec.name:
        raise ValueError(f"tensor names must be non-empty strings, got {spec.name!r}")
    if spec.name in seen:
        raise ValueError(f"tensor name {spec.name!r} appears twice")
    if spec.dtype not in _DTYPES.values():
        raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} is not cacheable "
                         f"(supported: {', '.join(sorted(_DTYPES))})")
    if not all(isinstance(d, int) and d >= 0 for d in spec.shape):
        raise ValueError(f"tensor {spec.name!r}: shape {spec.shape} must be non-negative integers")


def _check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"metadata must map strings to strings, got {metadata!r}")
    return dict(metadata)


def _check_bounds(manifest: Manifest, size: int) -> None:
    """Every entry must lie inside the segment with a consistent dtype/shape/size: never map past it."""
    model = manifest.model_id
    if manifest.total_bytes != size:
        raise CorruptManifestError(f"model {model!r}: manifest says {manifest.total_bytes} bytes, "
                                   f"the segment has {size}")
    for e in manifest.tensors:
        dtype = _DTYPES.get(e.dtype)
        if dtype is None:
            raise CorruptManifestError(f"model {model!r}: tensor {e.name!r} has unknown dtype {e.dtype!r}")
        expected = math.prod(e.shape) * dtype.itemsize
        if e.nbytes != expected:
            raise CorruptManifestError(f"model {model!r}: tensor {e.name!r} is {e.nbytes} bytes, "
                                       f"but shape {e.shape} of {e.dtype} needs {expected}")
        if e.offset % ALIGN or e.offset + e.nbytes > size:
            raise CorruptManifestError(f"model {model!r}: tensor {e.name!r} at offset {e.offset} "
                                       f"(+{e.nbytes} bytes) is misaligned or beyond the {size}-byte segment")


def _view(mm: mmap.mmap | None, entry: TensorEntry, dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(entry.shape)
    if entry.nbytes == 0:  # frombuffer refuses empty views; nothing to share anyway
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(mm, dtype=dtype, count=entry.nbytes // dtype.itemsize, offset=entry.offset)
    return flat.view(shape)


def _layout(entries: list[TensorEntry]) -> list[tuple[str, str, list[int]]]:
    return [(e.name, e.dtype, list(e.shape)) for e in entries]


def _allocate(fd: int, total: int, model_id: str) -> None:
    """Back the segment with memory now: a full /dev/shm then fails here, not as SIGBUS mid-copy."""
    try:
        reserve(fd, total)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CacheFullError(f"model {model_id!r} needs {total} bytes, but the file system holding "
                                 f"the cache is full (size /dev/shm or lower capacity_bytes)") from e
        raise


def _file_key(model_id: str) -> str:
    """A file-name-safe key: a readable prefix plus a hash, so distinct ids never share files."""
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:48]
    return f"{readable}-{hashlib.sha256(model_id.encode()).hexdigest()[:16]}"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _open_existing(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None


def _try_lock_exclusive(path: Path) -> int | None:
    """An fd holding EX on `path`, or None if some process holds a lock on it.

    FileNotFoundError if it is gone.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    if flock_now(fd):
        return fd
    os.close(fd)
    return None


def _wait_for_writer(fd: int) -> None:
    """Block until the process registering this segment finishes or dies, then let go."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
