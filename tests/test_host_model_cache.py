"""HostModelCache: shared-memory weights across real processes, crash cleanup, capacity, corrupt manifests."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest
import torch
from tokenpool.engine.host_model_cache import (
    ALIGN,
    CacheBusyError,
    CacheFullError,
    CacheLockTimeout,
    CacheMissError,
    CorruptManifestError,
    HostModelCache,
    Manifest,
    ModelConflictError,
    ModelInUseError,
    TensorEntry,
    TensorSpec,
    default_root,
)

CHILD_PRELUDE = """
import sys, time, torch
from pathlib import Path
from tokenpool.engine.host_model_cache import HostModelCache, TensorSpec
root, model_id = Path(sys.argv[1]), sys.argv[2]
cache = HostModelCache(root, progress=False)
"""


def make_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(64, 16, generator=g),
        "layers.0.qkv": torch.randn(48, 16, generator=g).to(torch.bfloat16),
        "norm": torch.ones(16),
        "step": torch.tensor(7, dtype=torch.int64),  # a 0-d tensor
    }


def register(cache: HostModelCache, model_id: str, weights: dict[str, torch.Tensor], **kw) -> None:
    specs = [TensorSpec.like(name, t) for name, t in weights.items()]
    cache.register(model_id, specs, lambda name, dest: dest.copy_(weights[name]), **kw)


def checksum(tensors: dict[str, torch.Tensor]) -> float:
    return sum(float(t.double().sum()) for t in tensors.values())


def one_block_model(cache: HostModelCache, model_id: str) -> None:
    """A model of exactly ALIGN bytes."""
    register(cache, model_id, {"w": torch.full((ALIGN // 4,), 1.0)})


def start_child(script: str, *args: str) -> subprocess.Popen:
    code = CHILD_PRELUDE + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)


def files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in (".registry.lock", ".capacity"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_round_trip_shares_memory_with_private_modes(root):
    cache = HostModelCache(root, progress=False)
    weights = make_weights()
    register(cache, "org/tiny-model", weights, metadata={"arch": "llama"})
    with cache.attach("org/tiny-model") as a, cache.attach("org/tiny-model") as b:
        assert a.metadata == {"arch": "llama"} and a.nbytes == cache.used_bytes
        for name, t in weights.items():
            assert a.tensors[name].dtype == t.dtype and torch.equal(a.tensors[name], t)
            assert a.tensors[name].data_ptr() % ALIGN == 0 or t.numel() == 0
        a.tensors["norm"][3] = 42.0  # one mapping of the segment ...
        assert b.tensors["norm"][3].item() == 42.0  # ... seen through another
        assert not a.pin_for_cuda() or torch.cuda.is_available()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in root.iterdir()} == {0o600}
    assert [m.model_id for m in cache.list()] == ["org/tiny-model"]


def test_register_is_idempotent_but_refuses_another_layout(root):
    cache = HostModelCache(root, progress=False)
    register(cache, "m", make_weights())
    register(cache, "m", make_weights(seed=1))  # same layout: a no-op, the first values stay
    with cache.attach("m") as m:
        assert torch.equal(m.tensors["embed"], make_weights()["embed"])
    with pytest.raises(ModelConflictError, match="'m' is already registered"):
        register(cache, "m", {"w": torch.zeros(100_000)})


def test_lease_in_another_process_is_released_by_the_kernel_on_kill(root):
    cache = HostModelCache(root, progress=False)
    weights = make_weights()
    register(cache, "m", weights)
    child = start_child("""
        lease = cache.attach(model_id)
        print(sum(float(t.double().sum()) for t in lease.tensors.values()), flush=True)
        time.sleep(60)
    """, str(root), "m")
    try:
        assert float(child.stdout.readline()) == pytest.approx(checksum(weights), rel=1e-12)
        with pytest.raises(ModelInUseError):
            cache.evict("m")
        assert cache.list()[0].in_use
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with cache.attach("m") as m:
        assert checksum(m.tensors) == checksum(weights)
    cache.evict("m")
    assert cache.list() == [] and files(root) == []


def test_a_process_stopped_inside_the_registry_lock_costs_a_timeout_not_a_hang(root):
    """A registry lock holder stopped (SIGSTOP) keeps its flock: attach, register and evict give
    up after lock_timeout_s with CacheLockTimeout, changing nothing; once the process is gone the
    cache works on."""
    cache = HostModelCache(root, progress=False)
    register(cache, "m", make_weights())
    child = start_child("""
        import fcntl, os, signal
        fd = os.open(os.path.join(sys.argv[1], ".registry.lock"), os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    """, str(root), "m")
    try:
        assert child.stdout.readline().strip() == "locked"
        cache.lock_timeout_s = 0.3
        with pytest.raises(CacheLockTimeout, match="registry lock stayed held for 0.3 s"):
            cache.attach("m")
        with pytest.raises(CacheLockTimeout):
            register(cache, "n", make_weights(seed=1))
        with pytest.raises(CacheLockTimeout):
            cache.evict("m")
        assert cache.contains("m") and not cache.contains("n")  # lock-free, and nothing changed
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with cache.attach("m") as m:
        assert checksum(m.tensors) == checksum(make_weights())
    register(cache, "n", make_weights(seed=1))
    assert sorted(x.model_id for x in cache.list()) == ["m", "n"]


def test_crashed_writer_is_swept_but_a_live_one_is_not(root):
    HostModelCache(root, progress=False)
    child = start_child("""
        def fill(name, dest):
            print("filling", flush=True)
            time.sleep(60)
        cache.register(model_id, [TensorSpec("w", torch.float32, (1024,))], fill)
    """, str(root), "m")
    try:
        assert child.stdout.readline() == "filling\n"
        assert HostModelCache(root, progress=False).used_bytes == ALIGN  # in progress: kept, reserved
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    cache = HostModelCache(root, progress=False)
    assert files(root) == [] and cache.used_bytes == 0
    with pytest.raises(CacheMissError, match="'m' is not in the host model cache"):
        cache.attach("m")


def test_concurrent_registration_of_one_id_waits_for_the_first(root):
    cache = HostModelCache(root, progress=False)
    slow = start_child("""
        def fill(name, dest):
            print("filling", flush=True)
            time.sleep(0.5)
            dest.fill_(3.0)
        cache.register(model_id, [TensorSpec("w", torch.float32, (1024,))], fill)
    """, str(root), "m")
    assert slow.stdout.readline() == "filling\n"
    calls = []
    cache.register("m", [TensorSpec("w", torch.float32, (1024,))], lambda name, dest: calls.append(name))
    assert slow.wait() == 0 and calls == []  # waited for the child, then found it registered
    with cache.attach("m") as m:
        assert torch.equal(m.tensors["w"], torch.full((1024,), 3.0))


def test_lru_eviction_of_unused_models(root):
    cache = HostModelCache(root, capacity_bytes=3 * ALIGN, progress=False)
    for model_id in ("a", "b", "c"):
        one_block_model(cache, model_id)
    cache.attach("a").close()  # a is now the most recently used
    one_block_model(cache, "d")
    assert sorted(m.model_id for m in cache.list()) == ["a", "c", "d"]
    assert cache.used_bytes == 3 * ALIGN


def test_cache_full_when_everything_is_attached_changes_nothing(root):
    cache = HostModelCache(root, capacity_bytes=2 * ALIGN, progress=False)
    one_block_model(cache, "a")
    one_block_model(cache, "b")
    before = files(root)
    with cache.attach("a"), cache.attach("b"):
        with pytest.raises(CacheFullError, match=r"'c' needs 4096 bytes.*'a' \(4096 bytes\)"):
            one_block_model(cache, "c")
    assert files(root) == before and cache.used_bytes == 2 * ALIGN


def test_model_bigger_than_capacity_is_refused(root):
    cache = HostModelCache(root, capacity_bytes=ALIGN, progress=False)
    with pytest.raises(CacheFullError, match="more than the cache's whole capacity of 4096"):
        register(cache, "big", {"w": torch.zeros(ALIGN)})
    assert files(root) == []


def test_fill_raising_leaves_nothing_behind(root):
    cache = HostModelCache(root, progress=False)

    def fill(name, dest):
        raise OSError("disk read failed")

    with pytest.raises(OSError, match="disk read failed"):
        cache.register("m", [TensorSpec("w", torch.float32, (10,))], fill)
    assert files(root) == [] and cache.list() == []
    register(cache, "m", make_weights())  # and the id can be registered again


def _manifest_path(root: Path) -> Path:
    (path,) = root.glob("*.manifest")
    return path


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _offset_past_end(data: bytes) -> bytes:
    m = msgspec.msgpack.decode(data, type=Manifest)
    bad = TensorEntry("w", "float32", [1024], 1 << 40, 4096)
    return msgspec.msgpack.encode(msgspec.structs.replace(m, tensors=[bad]))


def _wrong_types(data: bytes) -> bytes:
    m = msgspec.msgpack.decode(data)
    m["tensors"][0]["shape"] = "1024"
    return msgspec.msgpack.encode(m)


def _size_mismatch(data: bytes) -> bytes:
    m = msgspec.msgpack.decode(data, type=Manifest)
    bad = TensorEntry("w", "float32", [2048], 0, 4096)
    return msgspec.msgpack.encode(msgspec.structs.replace(m, tensors=[bad]))


@pytest.mark.parametrize("corrupt, message", [
    (_truncate, "corrupt manifest"),
    (_offset_past_end, "beyond the 4096-byte segment"),
    (_wrong_types, "corrupt manifest.*Expected `array`"),
    (_size_mismatch, "needs 8192"),
    (lambda data: b"\x00garbage", "corrupt manifest"),
])
def test_corrupt_manifest_is_a_clear_error_naming_the_model(root, corrupt, message):
    cache = HostModelCache(root, progress=False)
    register(cache, "org/m", {"w": torch.zeros(1024)})
    path = _manifest_path(root)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CorruptManifestError, match=f"model 'org/m'.*{message}"):
        cache.attach("org/m")
    cache.evict("org/m")  # a broken entry can still be removed
    assert files(root) == []


def test_default_root_is_per_user_shared_memory():
    root = default_root()
    assert root.name == "models" and root.parent.name == f"tokenpool-{os.getuid()}"
    assert root.parts[:3] == ("/", "dev", "shm") or not Path("/dev/shm").is_dir()


def test_processes_sharing_a_cache_share_the_first_users_capacity(root, caplog):
    """A second user asking for another capacity takes the first's (with a warning naming both), so
    no process evicts for a smaller capacity than the others keep; once every user has gone, even by
    SIGKILL, the next one sets its own."""
    child = start_child("""
        print(cache.capacity_bytes, flush=True)
        time.sleep(60)
    """, str(root), "unused")
    try:
        assert int(child.stdout.readline()) == 8 << 30  # the default, recorded: the first user
        with caplog.at_level(logging.WARNING, logger="tokenpool.engine.cache_capacity"):
            small = HostModelCache(root, capacity_bytes=3 * ALIGN, progress=False)
        assert small.capacity_bytes == 8 << 30
        assert "capacity of 8192 MiB; this one asked for 0.01172 MiB and uses theirs" in caplog.text
        assert "--host-cache-dir" in caplog.text
        small.close()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    small = HostModelCache(root, capacity_bytes=3 * ALIGN, progress=False)  # alone now: its own
    assert small.capacity_bytes == 3 * ALIGN
    same = HostModelCache(root, capacity_bytes=5 * ALIGN, progress=False)
    assert same.capacity_bytes == 3 * ALIGN  # one capacity per cache, in one process as across them
    for model_id in "abcd":
        one_block_model(same, model_id)
    assert small.used_bytes == 3 * ALIGN  # both evicted for the shared capacity
    small.close()
    same.close()


def test_an_unreadable_capacity_file_is_rewritten_by_the_next_user(root, caplog):
    HostModelCache(root, capacity_bytes=2 * ALIGN, progress=False).close()
    (root / ".capacity").write_bytes(b"\xc1" * 10_000)  # not msgpack, and past the size bound
    first = HostModelCache(root, capacity_bytes=4 * ALIGN, progress=False)  # alone: no read at all
    assert first.capacity_bytes == 4 * ALIGN
    (root / ".capacity").write_bytes(b"\x81\xa1x\x01")  # {"x": 1}: a record of another schema
    with caplog.at_level(logging.WARNING, logger="tokenpool.engine.cache_capacity"):
        second = HostModelCache(root, capacity_bytes=6 * ALIGN, progress=False)
    assert second.capacity_bytes == 6 * ALIGN and "unreadable" in caplog.text
    first.close()
    second.close()


def test_a_load_waiting_in_another_process_keeps_its_room_until_it_dies(root):
    """engine/room_queue.py across processes: a later registration gets room only beside what an
    earlier waiter needs; the waiter's place dies with its process (SIGKILL) and is removed."""
    cache = HostModelCache(root, capacity_bytes=3 * ALIGN, progress=False)
    child = start_child("""
        place = cache.wait_in_line(model_id, [TensorSpec("w", torch.float32, (2 * 1024,))])
        print("waiting", flush=True)
        time.sleep(60)
    """, str(root), "big")
    try:
        assert child.stdout.readline() == "waiting\n"
        one_block_model(cache, "a")  # 1 + 2 reserved: fits
        waiting = r"left for loads waiting since before this one: 'big' \(8192 bytes\)"
        with cache.attach("a"), pytest.raises(CacheBusyError, match=waiting):
            one_block_model(cache, "b")  # fits in what is free, not beside "big"
        assert files(root) == [*_segment_files(cache, "a"), f"wait-{child.pid}-0.wait"]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    one_block_model(cache, "b")  # the waiter is gone: its room with it
    assert files(root) == sorted([*_segment_files(cache, "a"), *_segment_files(cache, "b")])
    place = cache.wait_in_line("c", [TensorSpec("w", torch.float32, (1024,))])
    cache.register("c", [TensorSpec("w", torch.float32, (1024,))], lambda name, dest: dest.fill_(1.0),
                   place=place)
    assert place.fd == -1 and not any(name.endswith(".wait") for name in files(root))  # left on success


def _segment_files(cache: HostModelCache, model_id: str) -> list[str]:
    return sorted(p.name for p in cache.root.iterdir() if p.name.startswith(f"{model_id}-"))
