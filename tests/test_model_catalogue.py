"""The model catalogue: tiers (disk / host cache / resident), on-demand loads, scheduler-informed
eviction, run-time add/remove/evict/preload and their bad inputs (engine level, one instance)."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import cut_layers
from tokenpool.engine.cache_eviction import EvictionCandidate, ModelActivity
from tokenpool.engine.cold_loader import ColdLoader, LoadAbandonedError
from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.engine.host_model_cache import CacheBusyError, CacheFullError, HostModelCache, TensorSpec
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.model_catalogue import CatalogueError, ModelCatalogue, scan_catalogue
from tokenpool.engine.model_tiers import Tier
from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine
from tokenpool.engine.sampling_params import SamplingParams
from waiting import wait_for

PROMPT = "The quick brown fox"
NEW_TOKENS = 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_victims_skip_busy_and_expected_models_and_prefer_idle_cheap_ones():
    clock = FakeClock()
    activity = ModelActivity(reload_bytes_per_s=1e6, clock=clock)
    for model in ("old-big", "old-small", "recent", "busy"):
        activity.arrived(model)
        if model != "busy":
            activity.finished(model)
        clock.now += 50 if model.startswith("old") else 0
    clock.now += 1
    activity.expect("next")
    candidates = [EvictionCandidate(m, n) for m, n in
                  [("recent", 1000), ("old-big", 10_000_000), ("old-small", 1000), ("busy", 10),
                   ("next", 10), ("never-seen", 500_000)]]
    order = [c.model_id for c in activity.victim_order(candidates)]
    # never requested: free to drop; idle longest and cheap to reload next; busy / expected never
    assert order == ["never-seen", "old-small", "recent", "old-big"]
    activity.finished("busy")
    assert "busy" in [c.model_id for c in activity.victim_order(candidates)]
    with pytest.raises(ValueError, match="finished"):
        activity.finished("busy")


def test_a_large_load_waiting_for_room_is_not_starved_by_smaller_ones(shm_path):
    """Room freeing a bit at a time goes to the load that has waited longest: a small load that
    arrives later, and would fit in the first bit, waits behind it (engine/room_queue.py)."""
    cache = HostModelCache(shm_path / "cache", capacity_bytes=6 * 4096, progress=False)
    for model_id in ("a", "b"):
        cache.register(model_id, _specs(2), lambda name, dest: dest.fill_(1.0))
    leases = {m: cache.attach(m) for m in ("a", "b")}  # 4 of 6 blocks in use
    loader = ColdLoader(cache, room_wait_s=60)
    filled: list[str] = []  # the loads in the order they got their room and wrote

    def fill_as(model_id: str, value: float):
        def fill(name, dest):
            if not filled or filled[-1] != model_id:
                filled.append(model_id)
            dest.fill_(value)
        return fill

    big = loader.load("big", _specs(4), fill_as("big", 2.0))
    wait_for(lambda: any(p.waiting_for_room for p in loader.progress()), "the big load never waited")
    small = loader.load("small", _specs(2), fill_as("small", 3.0))  # fits in the free 2
    wait_for(lambda: sum(p.waiting_for_room for p in loader.progress()) == 2 or small.done(),
             "the small load neither waited nor ended")
    assert not small.done() and not filled  # the free room is the big load's first part
    leases.pop("a").close()  # 2 more blocks can go: enough for "big", which was first
    big.wait(30)
    small.wait(30)  # then the small one, evicting what nobody holds (big, maybe before we look)
    assert filled == ["big", "small"]
    assert cache.contains("small") and not cache.contains("a") and cache.used_bytes <= 6 * 4096
    for ticket in (big, small):
        ticket.cancel()
    leases.pop("b").close()
    loader.close()


def test_a_load_that_ended_unnoticed_counts_as_in_memory(shapes, shm_path):
    """A load started by a scan of the prefill queue (weights_ready on a queued group's model) ends
    while the engine thread waits on another model's load: weights_in_memory, which that wait
    checks for queued work to run first, must see it (it did not until weights_ready was asked
    again, which the waiting turn never did: its load then waited 120 s for the room this model held)."""
    engine, pool = _engine(shm_path, capacity=12 << 20, slot_bytes=3 << 20)
    catalogue = ModelCatalogue(engine)
    catalogue.add("queued", shapes["tiny-qwen2"])
    gate = threading.Event()
    engine.tiers._fills["queued"] = _gated(engine.tiers._fills["queued"], gate)
    assert engine.weights_ready("queued") is False  # the scan starts its load
    assert engine.weights_in_memory("queued") is False  # still on its way
    gate.set()
    wait_for(lambda: engine.tiers.loader.completed == 1, "the load never ended")
    assert engine.weights_in_memory("queued") is True and "queued" in engine._loading  # unnoticed
    assert engine.weights_ready("queued") is True and not engine._loading  # noticed: claim dropped
    engine.close()
    pool.close()


def _gated(open_fill, gate: threading.Event):
    """open_fill, whose fill holds each tensor until the gate opens."""
    def gated_fill():
        fill = open_fill()

        def slow(name, dest):
            assert gate.wait(30), "the test never opened the gate"
            fill(name, dest)
        return slow
    return gated_fill


def _specs(n: int) -> list[TensorSpec]:
    import torch

    return [TensorSpec(f"t{i}", torch.float32, (1024,)) for i in range(n)]


def test_concurrent_requests_share_one_load_and_a_cancelled_load_leaves_nothing(shm_path):
    cache = HostModelCache(shm_path / "cache", capacity_bytes=1 << 20, progress=False)
    loader = ColdLoader(cache)
    gate, filled = threading.Event(), []

    def slow_fill(name, dest):
        gate.wait(30)
        dest.fill_(1.0)
        filled.append(name)

    first, second = loader.load("m", _specs(4), slow_fill), loader.load("m", _specs(4), slow_fill)
    assert [p.waiters for p in loader.progress()] == [2]
    gate.set()
    first.wait(30)
    second.wait(30)
    assert cache.contains("m") and len(filled) == 4 and loader.completed == 1  # one read, not two
    first.cancel(), second.cancel()

    gate.clear()
    tickets = [loader.load("cold", _specs(8), slow_fill) for _ in range(3)]
    for t in tickets:
        t.cancel()
    gate.set()
    with pytest.raises(LoadAbandonedError, match="abandoned"):
        tickets[0].wait(30)
    assert not cache.contains("cold") and loader.abandoned == 1
    assert not list(cache.root.glob("*cold*")), "the partial segment must be removed"
    assert cache.used_bytes == cache.list()[0].nbytes  # only "m" is left
    loader.close()


def test_a_load_waits_for_room_held_by_a_model_in_use_and_gives_up_in_time(shm_path):
    """A cache full of a model in use: the load waits (progress says so) and proceeds once the
    lease goes; a smaller load that would fit waits behind the waiting one, until that one leaves
    the line; with nobody letting go a load fails after room_wait_s naming what holds the room,
    and one whose waiters all cancel while it waits is abandoned; nothing is left behind."""
    cache = HostModelCache(shm_path / "cache", capacity_bytes=6 * 4096, progress=False)
    cache.register("held", _specs(4), lambda name, dest: dest.fill_(1.0))
    lease = cache.attach("held")
    loader = ColdLoader(cache, room_wait_s=60)
    ticket = loader.load("next", _specs(4), lambda name, dest: dest.fill_(2.0))
    deadline = time.monotonic() + 30
    while not any(p.waiting_for_room for p in loader.progress()):
        assert time.monotonic() < deadline and not ticket.done(), "the load never waited for room"
        time.sleep(0.01)
    lease.close()  # the room frees: the load evicts "held" and goes on
    ticket.wait(30)
    assert cache.contains("next") and not cache.contains("held") and loader.completed == 1
    ticket.cancel()

    lease = cache.attach("next")
    waiting = loader.load("waiting", _specs(4), lambda name, dest: dest.fill_(6.0))  # does not fit
    while not any(p.waiting_for_room for p in loader.progress()):
        time.sleep(0.01)
    small = loader.load("small", _specs(2), lambda name, dest: dest.fill_(5.0))  # fits, not beside "waiting"
    wait_for(lambda: sum(p.waiting_for_room for p in loader.progress()) == 2 or small.done(),
             "the small load neither waited nor ended")
    assert not small.done() and not cache.contains("small")
    waiting.cancel()  # leaves the line: the small load goes on
    with pytest.raises(LoadAbandonedError):
        waiting.wait(30)
    small.wait(30)
    assert cache.contains("small") and not loader.progress()
    small.cancel()
    cache.evict("small")
    impatient = ColdLoader(cache, room_wait_s=0.3)
    with pytest.raises(CacheBusyError, match=r"'next' \(16384 bytes\).*waited 0.3 s for room"):
        impatient.load("late", _specs(4), lambda name, dest: dest.fill_(3.0)).wait(30)
    with pytest.raises(CacheFullError, match="more than the cache's whole capacity"):
        impatient.load("huge", _specs(8), lambda name, dest: None).wait(30)  # never fits: no wait
    dropped = loader.load("dropped", _specs(4), lambda name, dest: dest.fill_(4.0))
    while not any(p.waiting_for_room for p in loader.progress()):
        time.sleep(0.01)
    dropped.cancel()
    with pytest.raises(LoadAbandonedError, match="while waiting for host-cache room"):
        dropped.wait(30)
    assert [m.model_id for m in cache.list()] == ["next"] and cache.used_bytes == 4 * 4096
    assert loader.abandoned == 2 and not loader.progress()
    lease.close()
    loader.close()
    impatient.close()


@pytest.fixture(scope="module")
def shapes(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    folders = {name: tiny_dir / name for name in ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral")}
    folders["tiny-llama-2l"] = cut_layers(tiny_dir / "tiny-llama", root / "tiny-llama-2l", 2)
    return folders


def _expected(folders, dtype="float32"):
    out = {}
    for name, folder in folders.items():
        engine = LLMEngine(folder, EngineConfig(dtype=dtype, linear_kernel="dense"))
        seq = engine.generate([PROMPT], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[0]
        out[name] = seq.output_token_ids
    return out


def _engine(shm_path, capacity, slot_bytes, dtype="float32"):
    cache = HostModelCache(shm_path / "cache", capacity_bytes=capacity, progress=False)
    pool = HostKVPool(32 << 20, slab_bytes=1 << 20, shm_dir=shm_path)
    config = InstanceConfig(kv_bytes=2 << 20, slot_bytes=slot_bytes, engine=EngineConfig(dtype=dtype))
    return MultiModelEngine(config, cache, pool), pool


def _serve(engine, model_id, capacity_seen):
    seq = engine.add_request(model_id, PROMPT, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    engine.prefetch(model_id)
    while engine.has_unfinished(model_id):
        engine.step(model_id)
        capacity_seen.append(engine.cache.used_bytes)
    return seq.output_token_ids


def test_a_200_model_catalogue_in_a_small_host_cache_serves_every_model_exactly(shapes, shm_path):
    expected = _expected(shapes)
    ids = {f"m{i:03d}-{name}": name for i in range(40) for name in shapes}  # 200 ids, 5 shapes
    engine, pool = _engine(shm_path, capacity=12 << 20, slot_bytes=3 << 20)
    catalogue = ModelCatalogue(engine)
    for model_id, name in ids.items():
        catalogue.add(model_id, shapes[name])
    assert {e.tier for e in catalogue.entries()} == {Tier.DISK}  # nothing read yet
    used = []
    for model_id, name in ids.items():
        assert _serve(engine, model_id, used) == expected[name], model_id
        used.append(engine.cache.used_bytes)
    assert max(used) <= engine.cache.capacity_bytes
    assert engine.cache.counters.evictions > 150, "the cache holds a fraction of the catalogue"
    tiers = [e.tier for e in catalogue.entries()]
    assert tiers.count(Tier.RESIDENT) == 1 and tiers.count(Tier.HOST) >= 1 and tiers.count(Tier.DISK) > 150
    # a second pass over a few evicted models reads them from disk again, same tokens
    for model_id in list(ids)[:5]:
        assert _serve(engine, model_id, used) == expected[ids[model_id]]
    assert engine.tiers.loader.completed >= 205 and not engine.tiers.progress()
    engine.close()
    pool.close()


def test_a_burst_over_more_busy_models_than_the_cache_holds_completes_exactly(shapes, shm_path):
    """Requests for ten models at once (five shapes, 0.5-2.4 MiB) through a 6 MiB host cache: loads
    for models whose room is kept by queued work wait for it instead of failing those requests;
    the engine serves the models in memory meanwhile, as an instance's engine worker does (a model
    whose weights are ready, else nothing until one is: EngineWorker.activate waits without
    switching)."""
    expected = _expected(shapes)
    ids = {f"b{i}-{name}": name for i, name in enumerate(list(shapes) * 2)}
    engine, pool = _engine(shm_path, capacity=6 << 20, slot_bytes=3 << 20)
    catalogue = ModelCatalogue(engine)
    for model_id, name in ids.items():
        catalogue.add(model_id, shapes[name])
    seqs = {m: engine.add_request(m, PROMPT, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
            for m in ids}
    used, waited = [], 0
    while (with_work := [m for m in ids if engine.has_unfinished(m)]):
        waited += any(e.waiting_for_room for e in catalogue.entries())
        model = next((m for m in with_work if engine.weights_ready(m)), None)
        if model is None:  # every model with work is loading (or waiting for room)
            time.sleep(0.01)
            continue
        engine.step(model)
        used.append(engine.cache.used_bytes)
    assert {m: s.output_token_ids for m, s in seqs.items()} == {m: expected[n] for m, n in ids.items()}
    assert max(used) <= engine.cache.capacity_bytes and waited > 0, "no load had to wait for room"
    assert all(e.unfinished == 0 for e in catalogue.entries()) and not engine.tiers.progress()
    engine.close()
    pool.close()
    assert pool.stats().used_bytes == 0


def test_smollm2_under_three_ids_with_room_for_two(smollm2_dir, shm_path):
    expected = _expected({"smol": smollm2_dir})["smol"]
    engine, pool = _engine(shm_path, capacity=1200 << 20, slot_bytes=600 << 20)
    catalogue = ModelCatalogue(engine)
    for i in range(3):
        catalogue.add(f"smol-{i}", smollm2_dir)
    used = []
    for model_id in ("smol-0", "smol-1", "smol-2", "smol-0"):
        assert _serve(engine, model_id, used) == expected, model_id
    assert max(used) <= engine.cache.capacity_bytes and engine.cache.counters.evictions >= 2
    engine.close()
    pool.close()


def test_bad_catalogue_input_is_refused_with_nothing_half_registered(shapes, tmp_path, shm_path):
    engine, pool = _engine(shm_path, capacity=12 << 20, slot_bytes=3 << 20)
    catalogue = ModelCatalogue(engine)
    catalogue.add("ok", shapes["tiny-qwen2"])
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    broken = cut_layers(shapes["tiny-qwen2"], tmp_path / "broken", 2)
    (broken / "model.safetensors").write_bytes(b"\x00" * 4)
    cases = [
        (lambda: catalogue.add("x", tmp_path / "not-a-model"), "not a model"),
        (lambda: catalogue.add("x", broken), "safetensors"),
        (lambda: catalogue.add("ok", shapes["tiny-llama"]), "already in the catalogue"),
        (lambda: catalogue.add("../etc", shapes["tiny-llama"]), "not allowed"),
        (lambda: catalogue.add("a/b", shapes["tiny-llama"]), "not allowed"),
        (lambda: catalogue.remove("ghost"), "not in the catalogue"),
        (lambda: catalogue.evict("ok"), "not in the host cache"),
    ]
    small, pool2 = _engine(shm_path / "small", capacity=4 << 20, slot_bytes=64 << 10)
    cases.append((lambda: ModelCatalogue(small).add("big", shapes["tiny-llama"]), "arena model slot holds"))
    for call, message in cases:
        with pytest.raises(CatalogueError, match=message):
            call()
    assert sorted(engine.models) == ["ok"] and sorted(engine.tiers._profiles) == ["ok"]
    assert not small.models and engine.cache.used_bytes == 0
    with pytest.raises(CatalogueError, match="no model folder"):
        scan_catalogue(tmp_path / "not-a-model")
    for e in (engine, small):
        e.close()
    pool.close(), pool2.close()


def test_add_remove_evict_preload_while_requests_run(shapes, shm_path):
    expected = _expected(shapes)
    engine, pool = _engine(shm_path, capacity=12 << 20, slot_bytes=3 << 20)
    catalogue = ModelCatalogue(engine)
    for name, folder in shapes.items():
        catalogue.add(name, folder)
    seqs = {name: engine.add_request(name, PROMPT, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
            for name in shapes}
    ticket = catalogue.preload("tiny-qwen3")
    ticket.wait(60)
    ticket.cancel()
    assert catalogue.entry("tiny-qwen3").tier is Tier.HOST
    with pytest.raises(CatalogueError, match="unfinished requests"):
        catalogue.remove("tiny-qwen2")  # has work in flight: refused, its request keeps going
    with pytest.raises(CatalogueError, match="unfinished requests"):
        catalogue.evict("tiny-qwen3")
    catalogue.add("late", shapes["tiny-mistral"])
    seqs["late"] = engine.add_request("late", PROMPT, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    engine.abort("tiny-llama-2l", seqs.pop("tiny-llama-2l").request_id)
    catalogue.remove("tiny-llama-2l")  # drained (aborted): removal goes through
    for round_ in range(20):
        for name in list(seqs):
            if engine.has_unfinished(name):
                engine.switch_to(name)
                engine.step(name)
        if round_ == 1:
            catalogue.evict("tiny-qwen3") if not engine.has_unfinished("tiny-qwen3") else None
    for name, seq in seqs.items():
        assert seq.output_token_ids == expected.get(name, expected["tiny-mistral"]), name
    assert all(e.unfinished == 0 for e in catalogue.entries()) and not engine.tiers.progress()
    assert "tiny-llama-2l" not in engine.models
    stats = pool.stats()
    assert stats.used_bytes == 0
    engine.close()
    pool.close()


def test_weights_ready_starts_a_disk_load_in_the_background_and_reports_its_end(shapes, shm_path):
    """What the schedulers ask before a turn: a catalogue model on disk is not ready while its load
    runs (on the loader's thread, not the caller's), ready once it is in the host cache; a load that
    failed is 'ready' so the switch reports its error to the model's requests; a load whose model's
    requests were all aborted meanwhile is abandoned, its partial segment removed."""
    engine, pool = _engine(shm_path, capacity=12 << 20, slot_bytes=3 << 20)
    catalogue = ModelCatalogue(engine)
    catalogue.add("gated", shapes["tiny-llama"])
    catalogue.add("broken", shapes["tiny-qwen2"])
    catalogue.add("dropped", shapes["tiny-mistral"])
    engine.register("warm", shapes["tiny-qwen3"])  # not a catalogue model: read into the cache now
    gate = threading.Event()

    def broken_fill():
        def fail(name, dest):
            raise OSError("disk read failed")
        return fail

    fills = engine.tiers._fills
    fills["gated"], fills["dropped"] = _gated(fills["gated"], gate), _gated(fills["dropped"], gate)
    fills["broken"] = broken_fill
    assert engine.weights_ready("gated") is False  # its load started, held at the gate
    assert engine.weights_ready("gated") is False and engine.tiers.loader.loading("gated")
    engine.switch_to("warm")  # a model in memory switches in meanwhile
    assert engine.weights_ready("warm") is True
    gate.set()
    wait_for(lambda: engine.weights_ready("gated"), "the load never ended")
    assert engine.cache.contains("gated") and not engine._loading
    engine.switch_to("gated")  # no disk read now
    assert engine.active == "gated"
    while not engine.weights_ready("broken"):
        time.sleep(0.01)
    with pytest.raises(OSError, match="disk read failed"):  # the failed load's error, not read again
        engine.switch_to("broken", read_disk=False)
    assert not engine.tiers.loader.loading("broken")
    with pytest.raises(OSError, match="disk read failed"):  # a blocking switch reads again
        engine.switch_to("broken")
    assert engine.tiers.loader.completed == 1 and not engine._loading  # gated's
    gate.clear()
    seq = engine.add_request("dropped", PROMPT, SamplingParams(max_tokens=4))
    assert engine.weights_ready("dropped") is False
    engine.abort("dropped", seq.request_id)  # its only request goes: nobody waits for the load
    gate.set()
    while engine.tiers.loader.loading("dropped"):
        time.sleep(0.01)
    assert engine.tiers.loader.abandoned == 1 and not engine.cache.contains("dropped")
    assert not list(engine.cache.root.glob("dropped*")), "the partial segment must be removed"
    engine.close()
    pool.close()


def test_requests_queued_before_the_engine_keep_their_models_load_and_cache_copy(shapes, shm_path):
    """A prefill instance queues requests before they reach the engine (grouped FCFS; queued_before
    tells the engine). A model queued there is no eviction victim, and aborting its one request in
    the engine leaves its disk load running for the queued ones (before, the load was abandoned and
    read again from the start at their turn)."""
    engine, pool = _engine(shm_path, capacity=12 << 20, slot_bytes=3 << 20)
    ModelCatalogue(engine).add("queued", shapes["tiny-mistral"])
    gate = threading.Event()
    engine.tiers._fills["queued"] = _gated(engine.tiers._fills["queued"], gate)
    assert not engine.tiers.activity.busy("queued")
    waiting = {"queued"}
    engine.queued_before = lambda model: model in waiting
    assert engine.tiers.activity.busy("queued")  # kept from eviction
    seq = engine.add_request("queued", PROMPT, SamplingParams(max_tokens=4))
    assert engine.weights_ready("queued") is False
    engine.abort("queued", seq.request_id)  # the queue still holds requests for the model
    gate.set()
    wait_for(lambda: engine.weights_ready("queued"), "the load never ended")
    assert engine.tiers.loader.abandoned == 0 and engine.tiers.loader.completed == 1
    assert engine.cache.contains("queued")
    engine.close()
    pool.close()


def test_a_switch_that_finds_its_weights_gone_starts_their_load_and_does_not_wait(shapes, shm_path):
    """Another process may evict a model between weights_ready() and the switch. The engine worker's
    switch (read_disk=False) then starts the load and returns False at once, nothing moved, so the
    engine thread serves other models meanwhile; the next turn finds the weights and switches."""
    engine, pool = _engine(shm_path, capacity=12 << 20, slot_bytes=3 << 20)
    catalogue = ModelCatalogue(engine)
    catalogue.add("cold", shapes["tiny-llama"])
    engine.register("warm", shapes["tiny-qwen3"])
    engine.switch_to("warm")
    gate = threading.Event()
    catalogue.preload("cold").wait(30)  # read before the gate goes in
    engine.tiers._fills["cold"] = _gated(engine.tiers._fills["cold"], gate)
    assert engine.weights_ready("cold") is True
    catalogue.evict("cold")  # as another process's eviction would
    started = time.monotonic()
    assert engine.switch_to("cold", read_disk=False) is False
    assert time.monotonic() - started < 10, "the switch waited for the disk read"
    assert engine.active == "warm" and engine.tiers.loader.loading("cold")
    assert engine.weights_ready("cold") is False
    gate.set()
    wait_for(lambda: engine.weights_ready("cold"), "the load never ended")
    assert engine.switch_to("cold", read_disk=False) is True and engine.active == "cold"
    seq = engine.add_request("cold", PROMPT, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    while engine.has_unfinished("cold"):
        engine.step("cold")
    assert seq.output_token_ids == _expected({"cold": shapes["tiny-llama"]})["cold"]
    engine.close()
    pool.close()


def test_a_model_registered_at_start_up_and_evicted_is_read_again(shapes, shm_path):
    """A model registered eagerly (--model, not the catalogue) is tracked by the tiers too: an
    admin eviction or room made for a catalogue load does not lose it."""
    folders = {"eager": shapes["tiny-qwen2"]}
    engine, pool = _engine(shm_path, capacity=12 << 20, slot_bytes=3 << 20)
    catalogue = ModelCatalogue(engine)
    engine.register("warm", shapes["tiny-llama"])
    engine.register("eager", folders["eager"])
    assert catalogue.entry("eager").tier is Tier.HOST
    engine.switch_to("warm")
    catalogue.evict("eager")
    assert catalogue.entry("eager").tier is Tier.DISK
    catalogue.preload("eager").wait(30)
    assert catalogue.entry("eager").tier is Tier.HOST
    catalogue.evict("eager")
    assert _serve(engine, "eager", []) == _expected(folders)["eager"]  # switch reads it from disk
    engine.close()
    pool.close()
