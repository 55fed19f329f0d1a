"""AgentMetrics: the node's KV hand-off (the kvtransfer agent), for Prometheus.

    tokenpool_handoff_handles_total             handles allocated
    tokenpool_handoff_bytes_total               bytes of the blocks allocated for hand-offs
    tokenpool_handoff_releases_total            handles released by their reader (or cleanup)
    tokenpool_handoff_reclaimed_total           handles reclaimed after their ttl (a crashed peer)
    tokenpool_handoff_refused_total{reason}     allocations refused: pool_full | invalid
    tokenpool_handoff_pool_used_bytes / _capacity_bytes, tokenpool_handoff_live_handles,
    tokenpool_handoff_live_blocks                (read at scrape time, on the agent's event loop)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

SCRAPE_WAIT_S = 2.0


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.handles = Counter("tokenpool_handoff_handles", "KV hand-off handles allocated",
                               registry=registry)
        self.bytes = Counter("tokenpool_handoff_bytes", "Bytes of KV blocks allocated for hand-offs",
                             registry=registry)
        self.releases = Counter("tokenpool_handoff_releases", "Handles released", registry=registry)
        self.reclaimed = Counter("tokenpool_handoff_reclaimed", "Handles reclaimed after their ttl",
                                 registry=registry)
        self.refused = Counter("tokenpool_handoff_refused", "Allocations refused", ["reason"],
                               registry=registry)
        for reason in ("pool_full", "invalid"):
            self.refused.labels(reason)
        self._state = _PoolCollector()
        registry.register(self._state)

    def bind(self, loop: asyncio.AbstractEventLoop, read: Callable[[], dict[str, float]]) -> None:
        """read() -> {metric name: value}, run on loop (the agent's state is the loop's alone)."""
        self._state.loop, self._state.read = loop, read


class _PoolCollector(Collector):
    loop: asyncio.AbstractEventLoop | None = None
    read: Callable[[], dict[str, float]] | None = None

    def describe(self):
        return []

    def collect(self):
        if self.loop is None or self.read is None:
            return []

        async def read() -> dict[str, float]:
            return self.read()
        try:
            values = asyncio.run_coroutine_threadsafe(read(), self.loop).result(SCRAPE_WAIT_S)
        except (FutureTimeout, RuntimeError):  # the loop is busy or closed: skip this scrape
            return []
        return [GaugeMetricFamily(name, name.replace("_", " "), value=value)
                for name, value in values.items()]
