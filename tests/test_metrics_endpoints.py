"""Every service's Prometheus endpoint after a workload: the counters add up to the requests sent.

The stack (kvtransfer agent, 1 prefill, 2 decode, proxy) is started by the launcher, which asks
each service for a metrics endpoint on a free port and finds it in the service's ready file."""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenpool.compose.launcher import Stack, StackConfig
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc

MODELS = ("tiny-llama", "tiny-qwen3")
REQUESTS = 8  # half per model
MAX_TOKENS = 5
SETTLE_S = 20.0


@pytest.fixture(scope="module")
def stack(tiny_dir, tmp_path_factory):
    config = StackConfig(models={m: tiny_dir / m for m in MODELS}, prefill=1, decode=2, port=0,
                         dtype="float32", kv_mib=8, host_kv_mib=32, pool_mib=32, threads=1)
    stack = Stack(config, tmp_path_factory.mktemp("metrics-logs"))
    stack.start(progress=lambda line: None)
    yield stack
    codes = stack.stop()
    assert all(code == 0 for _, code in codes), codes


class Scrape:
    """One /metrics page: samples by name, each a list of (labels, value)."""

    def __init__(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
            text = reply.read().decode()
        self.samples: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[sample.name].append((sample.labels, sample.value))

    def total(self, name: str, **labels) -> float:
        assert name in self.samples, f"{name} missing; have {sorted(self.samples)}"
        return sum(v for lab, v in self.samples[name] if all(lab.get(k) == w for k, w in labels.items()))


def scrape_all(stack) -> dict[str, Scrape]:
    return {s.name: Scrape(s.metrics_url) for s in stack.services}


def settled(stack, check) -> dict[str, Scrape]:
    """Scrape until check(scrapes) holds (counters land just after a stream's last message), bounded."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        scrapes = scrape_all(stack)
        if check(scrapes) or time.monotonic() > deadline:
            return scrapes
        time.sleep(0.2)


def test_every_endpoint_serves_and_binds_loopback(stack):
    for service in stack.services:
        assert service.info["metrics"].startswith("127.0.0.1:"), service.info
    scrapes = scrape_all(stack)
    assert scrapes["proxy"].total("tokenpool_requests_total") == 0
    assert scrapes["kvtransfer-0"].total("tokenpool_handoff_pool_capacity_bytes") == 32 << 20


def test_counters_add_up_to_the_requests_sent(stack):
    with grpc.insecure_channel(stack.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        def send(i: int) -> list:
            request = pb.GenerateRequest(model=MODELS[i % 2], text=f"request number {i}",
                                         sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            return list(stub.Generate(request, timeout=120))
        with ThreadPoolExecutor(REQUESTS) as pool:
            results = list(pool.map(send, range(REQUESTS)))
        with pytest.raises(grpc.RpcError):
            list(stub.Generate(pb.GenerateRequest(model="nope", text="hi"), timeout=30))
    assert all(sum(len(r.token_ids) for r in rs) == MAX_TOKENS for rs in results)
    per_model = REQUESTS // len(MODELS)

    def done(s: dict[str, Scrape]) -> bool:
        decode = [s[n] for n in ("decode-0", "decode-1")]
        return (s["proxy"].total("tokenpool_requests_total", outcome="finished") >= REQUESTS
                and sum(d.total("tokenpool_instance_requests_total", outcome="finished") for d in decode)
                >= REQUESTS and s["kvtransfer-0"].total("tokenpool_handoff_releases_total") >= REQUESTS)
    s = settled(stack, done)
    proxy, prefill, agent = s["proxy"], s["prefill-0"], s["kvtransfer-0"]
    decode = [s["decode-0"], s["decode-1"]]

    # The proxy: every request counted once, by model and outcome.
    assert proxy.total("tokenpool_requests_total") == REQUESTS + 1
    assert proxy.total("tokenpool_requests_total", model="unknown", outcome="rejected") == 1
    for model in MODELS:
        assert proxy.total("tokenpool_requests_total", model=model, outcome="finished") == per_model
        assert proxy.total("tokenpool_ttft_seconds_count", model=model) == per_model
        assert proxy.total("tokenpool_tbt_seconds_count", model=model) == per_model * (MAX_TOKENS - 1)
        assert proxy.total("tokenpool_output_tokens_total", model=model) == per_model * MAX_TOKENS
        assert proxy.total("tokenpool_requests_in_flight", model=model) == 0
    assert proxy.total("tokenpool_ttft_seconds_sum") > 0
    assert proxy.total("tokenpool_slo_attainment_requests") == REQUESTS
    assert 0 <= proxy.total("tokenpool_slo_attainment", model=MODELS[0]) <= 1
    assert proxy.total("tokenpool_slo_tbt_seconds") > 0

    # The prefill instance prefilled each once; the decode instances between them finished each.
    for model in MODELS:
        prefilled = prefill.total("tokenpool_instance_requests_total", model=model, outcome="prefilled")
        assert prefilled == per_model
        assert sum(d.total("tokenpool_instance_requests_total", model=model, outcome="finished")
                   for d in decode) == per_model
    assert prefill.total("tokenpool_instance_requests_total") == REQUESTS
    assert sum(d.total("tokenpool_instance_requests_total") for d in decode) == REQUESTS
    assert prefill.total("tokenpool_instance_tokens_total") == REQUESTS
    assert sum(d.total("tokenpool_instance_tokens_total") for d in decode) == REQUESTS * (MAX_TOKENS - 1)

    # Switches: two models through one prefill instance switch at least once; each counted switch
    # has its latency observed.
    assert prefill.total("tokenpool_model_switches_total") >= 1
    for instance in (prefill, *decode):
        for model in MODELS:
            assert instance.total("tokenpool_model_switch_seconds_count", model=model) == \
                instance.total("tokenpool_model_switches_total", model=model)

    # The hand-off: one handle per request, each released, nothing left in the pool.
    assert agent.total("tokenpool_handoff_handles_total") == REQUESTS
    assert agent.total("tokenpool_handoff_releases_total") == REQUESTS
    assert agent.total("tokenpool_handoff_bytes_total") > 0
    assert agent.total("tokenpool_handoff_live_handles") == 0
    assert agent.total("tokenpool_handoff_pool_used_bytes") == 0

    # Scrape-time state of the instances: idle, memory and cache numbers present.
    for instance in (prefill, *decode):
        assert instance.total("tokenpool_queue_depth") == 0
        assert instance.total("tokenpool_requests_waiting_nonresident") == 0
        assert instance.total("tokenpool_instance_requests_active") == 0
        assert instance.total("tokenpool_host_kv_pool_capacity_bytes") == 32 << 20
        assert instance.total("tokenpool_arena_kv_blocks_total") > 0
        assert 0 <= instance.total("tokenpool_arena_kv_utilization") <= 1
        assert instance.total("tokenpool_host_model_cache_hits_total") + \
            instance.total("tokenpool_host_model_cache_misses_total") >= len(MODELS)
        assert "tokenpool_host_model_cache_evictions_total" in instance.samples
    assert any(d.total("tokenpool_decode_alpha") > 0 for d in decode if "tokenpool_decode_alpha" in d.samples)
    rounds = [d for d in decode if "tokenpool_decode_alpha" in d.samples]
    assert all(d.total("tokenpool_decode_kv_swap_correction") >= 1 for d in rounds)
    assert rounds and all("tokenpool_decode_round_switch_seconds" in d.samples for d in rounds)
