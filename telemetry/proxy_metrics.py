"""ProxyMetrics: what the front door sees of every request, for Prometheus.

    tokenpool_requests_total{model, outcome}   finished | cancelled | failed | rejected
    tokenpool_requests_in_flight{model}
    tokenpool_ttft_seconds{model}              histogram, arrival -> first token
    tokenpool_tbt_seconds{model}               histogram, per token after the first
    tokenpool_output_tokens_total{model}
    tokenpool_slo_attainment{model}            mean over requests ended in the last window
    tokenpool_slo_attainment_requests{model}   how many that mean is over

A request whose model is not served is counted under model="unknown" (so a client cannot
grow the label set). Attainment is the paper's (bench/metrics.py) against the SLO the
proxy was given or learned; finished requests score their attainment, failed ones 0,
cancelled and rejected ones are left out.
"""

from __future__ import annotations

import contextlib
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .attainment_window import AttainmentWindow

OUTCOMES = ("finished", "cancelled", "failed", "rejected")
UNKNOWN_MODEL = "unknown"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry, models: list[str], window_s: float = 60.0) -> None:
        self.models = set(models)
        self.slo = None  # a bench.metrics.SLO once known; attainment is not scored before
        self.requests = Counter("tokenpool_requests", "Requests by model and outcome",
                                ["model", "outcome"], registry=registry)
        self.in_flight = Gauge("tokenpool_requests_in_flight", "Requests admitted and not yet ended",
                               ["model"], registry=registry)
        self.ttft = Histogram("tokenpool_ttft_seconds", "Time to first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=registry)
        self.tbt = Histogram("tokenpool_tbt_seconds", "Time between tokens", ["model"],
                             buckets=TBT_BUCKETS, registry=registry)
        self.tokens = Counter("tokenpool_output_tokens", "Tokens streamed to clients", ["model"],
                              registry=registry)
        self.window = AttainmentWindow(window_s)
        registry.register(_AttainmentCollector(self))
        for model in models:  # every series exists from the start, at 0
            self.add_model(model)

    def add_model(self, model: str) -> None:
        """A model served from now on (at start, or added at run time): its series, at 0."""
        self.models.add(model)
        for outcome in OUTCOMES:
            self.requests.labels(model, outcome)
        self.in_flight.labels(model)

    def remove_model(self, model: str) -> None:
        """A model removed at run time: its series go (a later request counts as unknown)."""
        self.models.discard(model)
        for metric, labels in [(self.requests, (model, o)) for o in OUTCOMES] + [(self.in_flight, (model,))]:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)
        for metric in (self.ttft, self.tbt, self.tokens):
            with contextlib.suppress(KeyError):
                metric.remove(model)

    def label(self, model: str) -> str:
        return model if model in self.models else UNKNOWN_MODEL

    def rejected(self, model: str) -> None:
        self.requests.labels(self.label(model), "rejected").inc()

    def admitted(self, model: str, arrival: float) -> RequestMetrics:
        """A validated request (arrival: its time.perf_counter() when it came in)."""
        self.in_flight.labels(model).inc()
        return RequestMetrics(self, model, arrival)


class RequestMetrics:
    """One request's token times; ended() counts it once."""

    __slots__ = ("metrics", "model", "arrival", "token_times", "_ended")

    def __init__(self, metrics: ProxyMetrics, model: str, arrival: float) -> None:
        self.metrics = metrics
        self.model = model
        self.arrival = arrival
        self.token_times: list[float] = []
        self._ended = False

    def tokens(self, count: int, now: float | None = None) -> None:
        """count tokens arrived together (a chunk) at now."""
        if count < 1:
            return
        now = time.perf_counter() if now is None else now
        m = self.metrics
        if not self.token_times:
            m.ttft.labels(self.model).observe(now - self.arrival)
            count_after_first = count - 1
        else:
            count_after_first = count
        if count_after_first:
            previous = self.token_times[-1] if self.token_times else now
            gap = (now - previous) / count_after_first
            tbt = m.tbt.labels(self.model)
            for _ in range(count_after_first):
                tbt.observe(gap)
        self.token_times.extend([now] * count)
        m.tokens.labels(self.model).inc(count)

    def ended(self, outcome: str) -> None:
        if self._ended:
            return
        self._ended = True
        m = self.metrics
        m.requests.labels(self.model, outcome).inc()
        m.in_flight.labels(self.model).dec()
        if m.slo is not None and outcome in ("finished", "failed"):
            from tokenpool.bench.metrics import attainment

            score = attainment(self.arrival, self.token_times, m.slo, finished=outcome == "finished")
            m.window.add(self.model, score)


class _AttainmentCollector(Collector):
    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []  # collected on demand; nothing to register by name

    def collect(self):
        mean = GaugeMetricFamily("tokenpool_slo_attainment",
                                 "Mean SLO attainment of requests ended in the last window", labels=["model"])
        count = GaugeMetricFamily("tokenpool_slo_attainment_requests",
                                  "Requests the attainment mean is over", labels=["model"])
        for model, (value, n) in sorted(self.metrics.window.means().items()):
            mean.add_metric([model], value)
            count.add_metric([model], n)
        slo = self.metrics.slo
        yield mean
        yield count
        if slo is not None:
            yield GaugeMetricFamily("tokenpool_slo_ttft_seconds", "The TTFT target attainment is scored "
                                    "against", value=slo.ttft_s)
            yield GaugeMetricFamily("tokenpool_slo_tbt_seconds", "The TBT target attainment is scored "
                                    "against", value=slo.tbt_s)
