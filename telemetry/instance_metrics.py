"""InstanceMetrics: a prefill or decode instance's numbers, for Prometheus.

Counted as things happen (the engine thread reports switches and steps as a WorkerObserver;
the servicer reports each request's end):

    tokenpool_instance_requests_total{model, outcome}   prefill: prefilled | cancelled | failed
                                                        decode:  finished | cancelled | failed
    tokenpool_model_switches_total{model}               by the model switched to
    tokenpool_model_switch_seconds{model}               histogram
    tokenpool_model_switch_weight_bytes_total{model}
    tokenpool_engine_steps_total{model}, tokenpool_instance_tokens_total{model}

Read at scrape time, on the engine thread between steps (so never torn, and free while
nobody scrapes):

    tokenpool_queue_depth{model}                  requests taken but not yet running
    tokenpool_requests_waiting_nonresident{model} of those, the ones whose model is in
                                                  neither arena slot (scale-up signal)
    tokenpool_instance_requests_active{model}     unfinished requests on this instance
    tokenpool_active_model{model}                 1 for the model on the device
    tokenpool_host_kv_pool_used_bytes / _capacity_bytes
    tokenpool_arena_kv_blocks_used / _total, tokenpool_arena_kv_utilization
    tokenpool_host_model_cache_{hits,misses,evictions}_total, _used_bytes, _capacity_bytes
    tokenpool_decode_alpha, tokenpool_decode_quota_seconds{model}   (aegaeon decode)
    tokenpool_decode_round_switch_seconds         c: the switches and KV swap-ins a round pays
    tokenpool_decode_kv_swap_correction           KV swap-ins' measured / predicted (at least 1)
    tokenpool_model_cold_loads_total, _abandoned_total   catalogue models read from disk
    tokenpool_model_cold_load_bytes{model}        bytes read so far by a disk load in progress
    tokenpool_model_cold_load_waiting_for_room{model}   1 while that load waits for host-cache room
    tokenpool_catalogue_models{tier}              catalogue models on disk / host / resident
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from tokenpool.engine.engine_worker import EngineWorker, WorkerObserver
from tokenpool.engine.multi_model_engine import MultiModelEngine, SwitchRecord
from tokenpool.engine.request_book import RequestOutput

SWITCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCRAPE_WAIT_S = 2.0  # a scrape waits this long for the engine thread (one step, normally)
OUTCOMES = {"prefill": ("prefilled", "cancelled", "failed"), "decode": ("finished", "cancelled", "failed")}

# On the engine thread: model -> requests taken but not yet running.
QueuedFn = Callable[[MultiModelEngine], dict[str, int]]


class DecodeRound(NamedTuple):
    """The last decode round as planned (aegaeon)."""

    alpha: float
    quotas: dict[str, float]  # model -> seconds
    switch_s: float  # c
    kv_swap_correction: float


# On the engine thread: the last decode round, or None.
RoundFn = Callable[[], DecodeRound | None]


class InstanceMetrics(WorkerObserver):
    def __init__(self, registry: CollectorRegistry, role: str, models: list[str]) -> None:
        if role not in OUTCOMES:
            raise ValueError(f"role must be one of {sorted(OUTCOMES)}, got {role!r}")
        self.role = role
        self.requests = Counter("tokenpool_instance_requests", "Requests this instance ended, by outcome",
                                ["model", "outcome"], registry=registry)
        self.switches = Counter("tokenpool_model_switches", "Model switches, by the model switched to",
                                ["model"], registry=registry)
        self.switch_seconds = Histogram("tokenpool_model_switch_seconds", "Model switch latency",
                                        ["model"], buckets=SWITCH_BUCKETS, registry=registry)
        self.switch_bytes = Counter("tokenpool_model_switch_weight_bytes", "Weight bytes switched in",
                                    ["model"], registry=registry)
        self.steps = Counter("tokenpool_engine_steps", "Engine steps", ["model"], registry=registry)
        self.tokens = Counter("tokenpool_instance_tokens", "Tokens sampled", ["model"], registry=registry)
        for model in models:
            for outcome in OUTCOMES[role]:
                self.requests.labels(model, outcome)
            self.switches.labels(model)  # every series from the start, at 0: an instance that never
            self.switch_seconds.labels(model)  # switches to a model still reports it (and its count
            self.switch_bytes.labels(model)  # agrees with the switches counter)
        self._state = _StateCollector()
        registry.register(self._state)

    def bind(self, worker: EngineWorker, queued: QueuedFn, last_round: RoundFn | None = None) -> None:
        """Where the scrape-time numbers come from (the servicer calls this once its worker runs)."""
        self._state.worker, self._state.queued, self._state.last_round = worker, queued, last_round

    def request_ended(self, model: str, outcome: str) -> None:
        self.requests.labels(model, outcome).inc()

    # -- WorkerObserver (engine thread) ---------------------------------------------

    def switched(self, record: SwitchRecord) -> None:
        self.switches.labels(record.incoming).inc()
        self.switch_seconds.labels(record.incoming).observe(record.seconds)
        self.switch_bytes.labels(record.incoming).inc(record.weight_bytes)

    def stepped(self, model: str, outputs: list[RequestOutput]) -> None:
        self.steps.labels(model).inc()
        tokens = sum(len(out.new_token_ids) for out in outputs)
        if tokens:
            self.tokens.labels(model).inc(tokens)


class _StateCollector(Collector):
    worker: EngineWorker | None = None
    queued: QueuedFn | None = None
    last_round: RoundFn | None = None

    def describe(self):
        return []  # collected on demand (registering must not wait for the engine thread)

    def collect(self):
        if self.worker is None:
            return []
        try:
            return self.worker.call(self._families, timeout=SCRAPE_WAIT_S)
        except (FutureTimeout, RuntimeError):  # a long step, or the worker stopped: skip this scrape
            return []

    def _families(self, engine: MultiModelEngine) -> list:
        """Engine thread: every scrape-time family."""
        queued = self.queued(engine) if self.queued else {}
        resident = {m for m in engine.models if m == engine.active or engine.switcher.is_prefetched(m)}
        models = sorted(engine.models)
        families = [
            _gauge("tokenpool_queue_depth", "Requests taken but not yet running", queued, models),
            _gauge("tokenpool_requests_waiting_nonresident", "Queued requests whose model is on neither "
                   "arena slot", {m: n for m, n in queued.items() if m not in resident}, models),
            _gauge("tokenpool_instance_requests_active", "Unfinished requests on this instance",
                   {m: engine.num_requests(m) for m in models}, models),
            _gauge("tokenpool_active_model", "1 for the model on the device", {engine.active: 1}
                   if engine.active else {}, models),
        ]
        families += _memory(engine)
        families += _cache(engine)
        families += _tiers(engine)
        if self.last_round is not None and (last := self.last_round()) is not None:
            families.append(GaugeMetricFamily("tokenpool_decode_alpha", "The last decode round's alpha "
                                              "(mean TBT / TBT target)", value=last.alpha))
            families.append(_gauge("tokenpool_decode_quota_seconds", "The last decode round's time quota",
                                   last.quotas, sorted(last.quotas)))
            families.append(GaugeMetricFamily("tokenpool_decode_round_switch_seconds", "The last decode "
                                              "round's switch time c: its switches and KV swap-ins",
                                              value=last.switch_s))
            families.append(GaugeMetricFamily("tokenpool_decode_kv_swap_correction", "KV swap-ins beside "
                                              "the steps, measured / predicted from the start-up rate "
                                              "(at least 1)", value=last.kv_swap_correction))
        return families


def _gauge(name: str, doc: str, values: dict[str, float], models: list[str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["model"])
    for model in models:
        family.add_metric([model], values.get(model, 0))
    return family


def _memory(engine: MultiModelEngine) -> list:
    pool = engine.pool.stats()
    total = engine.models[engine.active].book.scheduler.blocks.num_blocks if engine.active else 0
    used = engine.kv_blocks_used
    return [
        GaugeMetricFamily("tokenpool_host_kv_pool_used_bytes", "Host KV pool: bytes of live blocks",
                          value=pool.used_bytes),
        GaugeMetricFamily("tokenpool_host_kv_pool_capacity_bytes", "Host KV pool size",
                          value=engine.pool.nbytes),
        GaugeMetricFamily("tokenpool_arena_kv_blocks_used", "Device KV blocks held (active model)",
                          value=used),
        GaugeMetricFamily("tokenpool_arena_kv_blocks_total", "Device KV blocks (active model's shape)",
                          value=total),
        GaugeMetricFamily("tokenpool_arena_kv_utilization", "Device KV blocks used / total",
                          value=used / total if total else 0.0),
    ]


def _cache(engine: MultiModelEngine) -> list:
    cache = engine.cache
    c = cache.counters
    return [
        CounterMetricFamily("tokenpool_host_model_cache_hits", "Registrations and attaches that found the "
                            "model cached", value=c.hits),
        CounterMetricFamily("tokenpool_host_model_cache_misses", "Registrations that read the checkpoint, "
                            "attaches that found nothing", value=c.misses),
        CounterMetricFamily("tokenpool_host_model_cache_evictions", "Models evicted to make room",
                            value=c.evictions),
        GaugeMetricFamily("tokenpool_host_model_cache_used_bytes", "Host model cache: bytes of segments",
                          value=cache.used_bytes),
        GaugeMetricFamily("tokenpool_host_model_cache_capacity_bytes", "Host model cache capacity",
                          value=cache.capacity_bytes),
    ]


def _tiers(engine: MultiModelEngine) -> list:
    """The models' disk loads and tiers (nothing before the first registration)."""
    tiers = engine.tiers
    if tiers is None:
        return []
    loading = GaugeMetricFamily("tokenpool_model_cold_load_bytes", "Bytes read so far by a disk load "
                                "in progress", labels=["model"])
    waiting = GaugeMetricFamily("tokenpool_model_cold_load_waiting_for_room", "1 while a disk load waits "
                                "for host-cache room held by models in use or with work", labels=["model"])
    for p in tiers.progress():
        loading.add_metric([p.model_id], p.loaded_bytes)
        waiting.add_metric([p.model_id], int(p.waiting_for_room))
    resident = {m for m in (engine.active, engine.switcher.active_model) if m}
    counts = dict.fromkeys(("disk", "host", "resident"), 0)
    for model_id in engine.models:
        if model_id in tiers:
            counts[tiers.tier(model_id, resident).value] += 1
    by_tier = GaugeMetricFamily("tokenpool_catalogue_models", "Catalogue models by tier", labels=["tier"])
    for tier, n in counts.items():
        by_tier.add_metric([tier], n)
    return [CounterMetricFamily("tokenpool_model_cold_loads", "Catalogue models read from disk into the "
                                "host cache", value=tiers.loader.completed),
            CounterMetricFamily("tokenpool_model_cold_loads_abandoned", "Disk loads dropped because every "
                                "request waiting for them was cancelled", value=tiers.loader.abandoned),
            loading, waiting, by_tier]
