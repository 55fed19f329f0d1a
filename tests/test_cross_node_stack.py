"""The stack as two simulated nodes on this machine (`tokenpool up --nodes 2`): each node its own
kvtransfer agent and pool, prefill instances on node 0, the decode instance on node 1, so every
request's KV crosses nodes over NIXL, streamed layer by layer while its prefill computes. The
services dial each other over mutual TLS (cli/internal_tls.py), agent to agent included."""

from __future__ import annotations

import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from pki import internal_tls_files
from stack_helpers import (
    agent_stats,
    check_streamed,
    expected_streams,
    instance_status,
    service,
    stream,
    wait_until_idle,
)
from tokenpool.compose.launcher import Stack, StackConfig
from tokenpool.protos.v1 import admin_pb2 as apb
from tokenpool.protos.v1 import admin_pb2_grpc, inference_pb2_grpc
from tokenpool.protos.v1 import inference_pb2 as pb

# Looked up, not imported: NIXL's bindings loaded beside grpc_tools' protoc (test_protos) crash it.
if importlib.util.find_spec("nixl") is None:
    pytest.skip("nixl is not installed", allow_module_level=True)

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3")
IDLE = "tiny-mistral"  # served, but no request needs it until the admin test moves it
PROMPTS = ("The quick brown fox", "Numbers 12345 and more", "Hi there",
           "A prompt long enough to need more than one block of sixteen tokens in the paged KV cache.")
LONG = " ".join(f"word{i}" for i in range(120))  # several hundred tokens: its prefill takes a while
STALL_S = 3.0


@pytest.fixture(scope="module")
def internal_pki(tmp_path_factory) -> dict:
    return internal_tls_files(tmp_path_factory.mktemp("cross-node-pki"))


@pytest.fixture(scope="module")
def stack(tiny_dir, token_file, internal_pki, tmp_path_factory):
    config = StackConfig(models={m: tiny_dir / m for m in (*MODELS, IDLE)}, prefill=2, decode=1, port=0,
                         dtype="float32", kv_mib=8, host_kv_mib=32, pool_mib=32, threads=1, table_slots=48,
                         nodes=2, kv_stall_s=STALL_S, admin_token_file=token_file, **internal_pki)
    stack = Stack(config, tmp_path_factory.mktemp("cross-node-logs"))
    stack.start(progress=lambda line: None)
    yield stack
    codes = stack.stop()
    assert all(code == 0 for name, code in codes if name != "prefill-0"), codes  # prefill-0 gets killed


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def test_two_nodes_have_their_own_agents_and_pools(stack):
    assert [s.name for s in stack.services if s.name.startswith("kvtransfer")] == ["kvtransfer-0",
                                                                                 "kvtransfer-1"]
    pools = {service(stack, n).info["pool"] for n in ("kvtransfer-0", "kvtransfer-1")}
    assert len(pools) == 2 and all(service(stack, n).info["nixl"] for n in ("kvtransfer-0", "kvtransfer-1"))


def test_twenty_concurrent_cross_node_streams_give_the_engines_greedy_tokens(stack, stub, tiny_dir):
    jobs = [(MODELS[i % 3], PROMPTS[i % len(PROMPTS)], (8, 16)[i % 2]) for i in range(20)]
    expected = expected_streams(tiny_dir, jobs)
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: stream(stub, *job), jobs))
    for job, responses in zip(jobs, results, strict=True):
        check_streamed(job, responses, expected)
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    wait_until_idle(stack)
    # The KV crossed: node 1's agent registered node 0's, and the node-0 pool is empty again.
    assert "registered peer kvtransfer-0" in service(stack, "kvtransfer-1").log.read_text()
    assert agent_stats(stack, "kvtransfer-0").handles == 0


def test_evict_and_preload_reach_each_nodes_host_cache(stack, stub, tiny_dir, token_file):
    """Node 1 has a host cache of its own: the admin's evict and preload act on both nodes'."""
    auth = [("authorization", f"Bearer {token_file.read_text().strip()}")]
    caches = {n: instance_status(stack, n).host_cached for n in ("prefill-0", "decode-0")}
    assert all(IDLE in cached for cached in caches.values()), caches  # read at start-up on both nodes
    with grpc.insecure_channel(stack.address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        reply = admin.EvictModel(apb.ModelRef(id=IDLE), metadata=auth, timeout=60)
        assert reply.message == f"evicted {IDLE} from the host cache on 2 nodes (tier disk)", reply.message
        for name in ("prefill-0", "prefill-1", "decode-0"):  # node 0's instances share its cache
            assert IDLE not in instance_status(stack, name).host_cached, name
        reply = admin.PreloadModel(apb.ModelRef(id=IDLE), metadata=auth, timeout=60)
    assert reply.message.startswith(f"preloading {IDLE} on 2 nodes: tier "), reply.message
    deadline = time.monotonic() + 60
    while not all(IDLE in instance_status(stack, n).host_cached for n in ("prefill-0", "decode-0")):
        assert time.monotonic() < deadline, "the preload never reached both nodes"
        time.sleep(0.05)
    job = (IDLE, PROMPTS[0], 8)
    check_streamed(job, stream(stub, *job), expected_streams(tiny_dir, [job]))
    wait_until_idle(stack)


def test_killing_a_prefill_instance_mid_transfer_frees_both_pools_and_requests_complete(stack, stub,
                                                                                       tiny_dir):
    jobs = [(MODELS[i % 3], LONG if i % 2 else PROMPTS[i % len(PROMPTS)], 8) for i in range(12)]
    expected = expected_streams(tiny_dir, jobs)
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(stream, stub, *job) for job in jobs]
        deadline = time.monotonic() + 30
        while not agent_stats(stack, "kvtransfer-1").handles:  # a transfer to node 1 is under way
            assert time.monotonic() < deadline, "no transfer started"
            time.sleep(0.005)
        service(stack, "prefill-0").process.kill()
        results = [f.result() for f in futures]
    for job, responses in zip(jobs, results, strict=True):
        check_streamed(job, responses, expected)
    wait_until_idle(stack, ["prefill-1", "decode-0"], timeout=4 * STALL_S + 10)
