"""GatewayMetrics: per-model serving metrics on the gateway's /metrics, under vLLM's names.

We follow vLLM's `vllm:` names and its `model_name` label because the routers and
autoscalers users put in front of model servers scrape exactly those (the Gateway API
inference extension's endpoint picker, llm-d, KEDA/HPA recipes, vLLM's Grafana
dashboards): a tokenpool stack then drops in where a vLLM server was.

    vllm:num_requests_running{model_name}       sent to the proxy, first token seen, not ended
    vllm:num_requests_waiting{model_name}       sent to the proxy, no token yet
    vllm:kv_cache_usage_perc{model_name}        device KV in use on the instances where the
                                                model is active (0-1; polled from ListModels)
    vllm:gpu_cache_usage_perc{model_name}       the same, under vLLM's older name
    vllm:time_to_first_token_seconds{model_name}
    vllm:inter_token_latency_seconds{model_name}
    vllm:e2e_request_latency_seconds{model_name}
    vllm:request_queue_time_seconds{model_name} arrival to the first token less the proxy's
                                                own time to it (queueing at the gateway and
                                                between the services; the proxy's queue and
                                                prefill are in its tokenpool_ttft_seconds)
    vllm:prompt_tokens_total{model_name}, vllm:generation_tokens_total{model_name}
    vllm:request_success_total{model_name, finished_reason}

Labels are only the ids in the proxy's catalogue (gateway/catalogue.py; requests for others
are refused before they are counted), so clients cannot grow the label set. A model added at
run time gets its series, at 0, once the catalogue sees it; a removed model's series go once
its last request here has ended.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from tokenpool.protos.v1 import inference_pb2 as pb

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
REASONS = ("stop", "length", "abort")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, models=()) -> None:
        """models: ids to have series from the start (follow() changes the set later)."""
        label = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests generating", label, registry=registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for their first token", label,
                             registry=registry)
        self.kv = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", label, registry=registry)
        self.kv_old = Gauge("vllm:gpu_cache_usage_perc", "KV cache usage (1 = full); vLLM's older name",
                            label, registry=registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", label,
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between tokens", label,
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to the last token", label,
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time queued before the proxy's clock",
                               label, buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens", label, registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", label,
                                         registry=registry)
        self.success = Counter("vllm:request_success", "Requests ended, by finish reason",
                               ["model_name", "finished_reason"], registry=registry)
        self.models: set[str] = set()
        self.live: Tally[str] = Tally()  # requests of each model whose timer has not ended
        self.follow(models)

    def follow(self, models) -> None:
        """The catalogue's ids now: new ones get every series at 0; ids gone lose theirs once no
        request of theirs is live (retried on the next call)."""
        for model in set(models) - self.models:
            for metric in (self.running, self.waiting, self.kv, self.kv_old, self.prompt_tokens,
                           self.generation_tokens):
                metric.labels(model)
            for reason in REASONS:
                self.success.labels(model, reason)
        for model in self.models - set(models):
            if not self.live[model]:
                self._remove(model)
        self.models = set(models) | {m for m in self.models if self.live[m]}

    def _remove(self, model: str) -> None:
        del self.live[model]
        for metric in (self.running, self.waiting, self.kv, self.kv_old, self.prompt_tokens,
                       self.generation_tokens, self.ttft, self.itl, self.e2e, self.queue):
            with contextlib.suppress(KeyError):
                metric.remove(model)
        for reason in REASONS:
            with contextlib.suppress(KeyError):
                self.success.remove(model, reason)

    def started(self, model: str) -> RequestTimer:
        """A timer for a request of a catalogue model (its series stay while the request is live)."""
        self.models.add(model)
        return RequestTimer(self, model, time.perf_counter())

    def set_kv_usage(self, models: list[pb.ModelInfo]) -> None:
        for info in models:
            if info.id not in self.models:
                continue
            self.kv.labels(info.id).set(info.kv_cache_usage)
            self.kv_old.labels(info.id).set(info.kv_cache_usage)


class RequestTimer:
    """One Generate call's times: waiting until its first token, running until it ends."""

    __slots__ = ("m", "model", "arrival", "first", "last", "state")

    def __init__(self, metrics: GatewayMetrics, model: str, arrival: float) -> None:
        self.m, self.model, self.arrival = metrics, model, arrival
        self.first = self.last = None
        self.state = "waiting"
        metrics.live[model] += 1
        metrics.waiting.labels(model).inc()

    def tokens(self, count: int, response: pb.GenerateResponse) -> None:
        """count tokens arrived in one message (the last carries the usage)."""
        now, m = time.perf_counter(), self.m
        if self.first is None:
            self.first = now
            m.waiting.labels(self.model).dec()
            m.running.labels(self.model).inc()
            self.state = "running"
            m.ttft.labels(self.model).observe(now - self.arrival)
        elif count:
            gap = (now - self.last) / count
            for _ in range(count):
                m.itl.labels(self.model).observe(gap)
        self.last = now
        m.generation_tokens.labels(self.model).inc(count)
        if response.finish_reason:
            m.prompt_tokens.labels(self.model).inc(response.usage.prompt_tokens)
            m.e2e.labels(self.model).observe(now - self.arrival)
            here = self.first - self.arrival
            m.queue.labels(self.model).observe(max(0.0, here - response.usage.ttft_seconds))

    def ended(self, reason: str | None) -> None:
        """Once, however the call ended (reason: stop, length, abort)."""
        if self.state == "ended":
            return
        gauge = self.m.waiting if self.state == "waiting" else self.m.running
        gauge.labels(self.model).dec()
        self.state = "ended"
        self.m.success.labels(self.model, reason or "abort").inc()
        self.m.live[self.model] -= 1
