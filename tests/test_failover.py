"""Instances fail for real (kill -9, SIGSTOP, SIGTERM) under live streams; every accepted request
still completes with exactly the undisturbed greedy tokens, and nothing leaks."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stack_helpers import (
    expected_streams,
    instance_status,
    seeded_sampling,
    service,
    start_tiny_stack,
    stream,
    wait_until_idle,
)
from stalled_lock import StalledLockHolder
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc
from tokenpool.proxy.fleet_backend import HEALTH_PROBE_S, HEALTH_TIMEOUT_S, LOST_AFTER
from tokenpool.proxy.shm_request_table import HEADER_BYTES, ShmRequestTable

MODELS = ("tiny-llama", "tiny-qwen3")
PROMPTS = ("The quick brown fox", "Numbers 12345 and more", "A longer prompt, with commas.")
# A hung instance is declared lost after LOST_AFTER failed probes; its requests resume after a
# prefill of prompt + streamed tokens. The stated bound on the gap a client sees:
DETECTION_S = LOST_AFTER * (HEALTH_PROBE_S + HEALTH_TIMEOUT_S)
MIGRATION_BOUND_S = DETECTION_S + 5.0


def start_stack(tiny_dir, tmp_path, prefill=1, decode=2):
    return start_tiny_stack(tiny_dir, MODELS, tmp_path / "logs", prefill=prefill, decode=decode,
                            table_slots=64)


@pytest.fixture
def two_decode(tiny_dir, tmp_path):
    stack = start_stack(tiny_dir, tmp_path)
    yield stack
    stack.stop()


class Streams:
    """Every job's stream on a thread of its own, its responses and their arrival times recorded."""

    def __init__(self, stack, jobs) -> None:
        self.received = 0
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(stack.address)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._pool = ThreadPoolExecutor(len(jobs))
        self._futures = [self._pool.submit(self._one, job) for job in jobs]

    def _one(self, job):
        model, prompt, n, *seed = job
        request = pb.GenerateRequest(model=model, text=prompt, sampling=pb.SamplingParams(
            max_tokens=n, ignore_eos=True, **seeded_sampling(*seed)))
        out, times = [], []
        for response in self._stub.Generate(request, timeout=240):
            out.append(response)
            times.append(time.monotonic())
            with self._lock:
                self.received += len(response.token_ids)
        return out, times

    def wait_for_tokens(self, count, timeout=120):
        deadline = time.monotonic() + timeout
        while self.received < count:
            assert time.monotonic() < deadline, f"only {self.received} tokens after {timeout} s"
            time.sleep(0.02)

    def results(self):
        """Every stream's (responses, arrival times), once all have ended."""
        try:
            return [f.result(timeout=240) for f in self._futures]
        finally:
            self._pool.shutdown()
            self._channel.close()


def check_exact(jobs, results, expected):
    for job, (responses, _) in zip(jobs, results, strict=True):
        tokens, num_prompt, _ = expected[job]
        assert [t for r in responses for t in r.token_ids] == tokens, job
        last = responses[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH, job
        assert last.usage.completion_tokens == job[2] and last.usage.prompt_tokens == num_prompt


def jobs_of(count, n, seeded=0):
    """(model, prompt, n) jobs; the first `seeded` sample at temperature SEEDED_TEMPERATURE with a seed
    of their own (a 4th element)."""
    return [(MODELS[i % 2], PROMPTS[i % len(PROMPTS)], n, *([1000 + i] if i < seeded else []))
            for i in range(count)]


def redispatches(stack, lost: str) -> int:
    """Requests the proxy dispatched again after losing the named instance (its log says so)."""
    text = (stack.log_dir / "proxy.log").read_text()
    return sum(1 for line in text.splitlines()
               if f": {lost} lost after" in line and "dispatching again" in line)


def decode_busy(stack, name) -> int:
    return sum(instance_status(stack, name).requests_by_model.values())


def test_kill_9_of_a_decode_instance_mid_stream_loses_and_repeats_no_token(two_decode, tiny_dir):
    jobs = jobs_of(20, 200, seeded=6)  # seeded sampling resumes exactly too
    expected = expected_streams(tiny_dir, jobs)
    streams = Streams(two_decode, jobs)
    streams.wait_for_tokens(300)
    # The instance decoding the most streams now: where requests land depends on how fast
    # prefills arrive (a slow or busy machine can put every batch on one of the two).
    busy = {name: decode_busy(two_decode, name) for name in ("decode-0", "decode-1")}
    lost = max(busy, key=busy.get)
    assert busy[lost] > 0, busy
    os.kill(service(two_decode, lost).process.pid, signal.SIGKILL)
    results = streams.results()
    check_exact(jobs, results, expected)
    assert redispatches(two_decode, lost) > 0
    wait_until_idle(two_decode, ["prefill-0", *(name for name in busy if name != lost)])


def test_a_hung_decode_instance_is_detected_and_its_streams_move_and_it_rejoins_fenced(two_decode, tiny_dir):
    jobs = jobs_of(12, 200)
    expected = expected_streams(tiny_dir, jobs)
    streams = Streams(two_decode, jobs)
    streams.wait_for_tokens(200)
    victim = service(two_decode, "decode-0")
    os.kill(victim.process.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        results = streams.results()
    finally:
        os.kill(victim.process.pid, signal.SIGCONT)
    check_exact(jobs, results, expected)  # nothing lost, nothing twice
    assert redispatches(two_decode, "decode-0") > 0
    worst_gap = max(b - a for _, times in results for a, b in zip(times, times[1:], strict=False)
                    if b > stopped_at)
    assert worst_gap < MIGRATION_BOUND_S, worst_gap
    # Back from SIGCONT: its abandoned sequences are freed (their calls were cancelled), it
    # answers health again and serves new work; the finished streams got nothing more.
    deadline = time.monotonic() + 30
    while decode_busy(two_decode, "decode-0") or instance_status(two_decode, "decode-0").kv_blocks_used:
        assert time.monotonic() < deadline, instance_status(two_decode, "decode-0")
        time.sleep(0.2)
    with grpc.insecure_channel(two_decode.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        more = jobs_of(8, 8)
        expected_more = expected_streams(tiny_dir, more)
        with ThreadPoolExecutor(8) as p:
            check_exact(more, [(r, None) for r in p.map(lambda j: stream(stub, *j), more)], expected_more)
    wait_until_idle(two_decode)


def test_sigterm_drains_a_decode_instance_and_its_streams_finish(two_decode, tiny_dir):
    jobs = jobs_of(10, 200)
    expected = expected_streams(tiny_dir, jobs)
    streams = Streams(two_decode, jobs)
    streams.wait_for_tokens(100)
    victim = service(two_decode, "decode-0")
    os.kill(victim.process.pid, signal.SIGTERM)
    with grpc.insecure_channel(victim.address) as ch:  # health says so while it drains
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        deadline = time.monotonic() + 3
        while reply.status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    # A clean exit: the 5 s drain, then its streams handed on and the engine closed; the bound is
    # generous because a loaded machine (the suite beside other work) once took over 30 s.
    assert victim.process.wait(120) == 0
    results = streams.results()
    check_exact(jobs, results, expected)
    wait_until_idle(two_decode, ["prefill-0", "decode-1"])


def test_killing_a_prefill_instance_with_requests_on_it_requeues_them(tiny_dir, tmp_path):
    stack = start_stack(tiny_dir, tmp_path, prefill=2, decode=1)
    try:
        victim = service(stack, "prefill-0")
        os.kill(victim.process.pid, signal.SIGSTOP)  # requests placed on it now wait there
        jobs = jobs_of(10, 16)
        expected = expected_streams(tiny_dir, jobs)
        streams = Streams(stack, jobs)
        time.sleep(0.5)
        os.kill(victim.process.pid, signal.SIGKILL)
        results = streams.results()
        check_exact(jobs, results, expected)
        wait_until_idle(stack, ["prefill-1", "decode-0"])
    finally:
        stack.stop()


def test_with_no_decode_instance_left_a_request_fails_unavailable_at_once(two_decode):
    for name in ("decode-0", "decode-1"):
        os.kill(service(two_decode, name).process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10 * DETECTION_S  # the proxy's probes find both gone
    log = two_decode.log_dir / "proxy.log"
    while not all(f"instance {name} lost" in log.read_text() for name in ("decode-0", "decode-1")):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    with grpc.insecure_channel(two_decode.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stream(stub, MODELS[0], "anyone there?", 4, timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert time.monotonic() - start < 5


def test_a_process_stalled_inside_a_rows_lock_holds_up_no_stream_and_the_row_ends_after_it(
        two_decode, tiny_dir):
    """The shared-memory table's row locks are the kernel's: a process stopped while it holds one
    (an instance SIGSTOPped mid-report) keeps it. Every stream still completes exactly, the
    proxy's loop never waits on that lock, and the row is released once the process is gone."""
    jobs = jobs_of(8, 200)
    expected = expected_streams(tiny_dir, jobs)
    with ShmRequestTable.attach(two_decode.name) as table:
        holder = StalledLockHolder(table.path)  # started first: the lock lands while the row is live
        try:
            streams = Streams(two_decode, jobs)
            streams.wait_for_tokens(50)
            slot, record = table.records()[0]
            holder.lock(HEADER_BYTES + slot * table.slot_bytes, table.slot_bytes)
            assert table.get(slot).request_id == record.request_id  # still streaming when locked
            check_exact(jobs, streams.results(), expected)
            deadline = time.monotonic() + 60  # the other rows end just after their streams do
            while table.usage().used > 1:
                assert time.monotonic() < deadline, table.records()
                time.sleep(0.05)
            assert table.find(record.request_id) == slot  # the locked row: its end waits for the lock
            more = jobs_of(4, 8)
            with grpc.insecure_channel(two_decode.address) as ch:
                stub = inference_pb2_grpc.InferenceStub(ch)
                with ThreadPoolExecutor(4) as p:
                    check_exact(more, [(r, None) for r in p.map(lambda j: stream(stub, *j), more)],
                                expected_streams(tiny_dir, more))
        finally:
            holder.kill()
    wait_until_idle(two_decode)  # the row released once its lock went
    assert f"slot {slot} stayed locked" in (two_decode.log_dir / "proxy.log").read_text()
