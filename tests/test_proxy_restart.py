"""kill -9 of the proxy mid-stream: the request table in shared memory outlives it; a proxy
started again with the same flags adopts the table, reclaims the dead proxy's rows and their
hand-off KV, dispatches nothing twice, and serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from stack_helpers import instance_status, service, start_tiny_stack, stream, wait_until_idle
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc
from tokenpool.proxy.shm_request_table import ShmRequestTable

MODELS = ("tiny-llama", "tiny-qwen3")


@pytest.fixture
def stack(tiny_dir, tmp_path):
    stack = start_tiny_stack(tiny_dir, MODELS, tmp_path / "logs", prefill=1, decode=1, table_slots=32)
    yield stack
    stack.stop()


def test_a_restarted_proxy_reclaims_the_dead_ones_rows_and_serves(stack, tmp_path):
    proxy = service(stack, "proxy")
    argv = Path(f"/proc/{proxy.process.pid}/cmdline").read_bytes().split(b"\0")[:-1]
    received = [0]
    errors = []

    def client(i):
        with grpc.insecure_channel(stack.address) as channel:
            request = pb.GenerateRequest(model=MODELS[i % 2], text=f"stream {i}", sampling=pb.SamplingParams(
                max_tokens=400, ignore_eos=True))
            try:
                for response in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120):
                    received[0] += len(response.token_ids)
            except grpc.RpcError as exc:
                errors.append(exc.code())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while received[0] < 100:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proxy.process.pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert len(errors) == 10 and set(errors) == {grpc.StatusCode.UNAVAILABLE}, errors
    with ShmRequestTable.attach(stack.name) as table:
        left = table.usage().used
    assert left > 0  # the dead proxy's rows are still there: this is what the new one must clean

    ready = Path(argv[argv.index(b"--ready-file") + 1].decode())
    ready.unlink()
    log = open(tmp_path / "proxy-2.log", "w")  # noqa: SIM115 - closed below
    restarted = subprocess.Popen([a.decode() for a in argv], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert restarted.poll() is None, (tmp_path / "proxy-2.log").read_text()
            assert time.monotonic() < deadline, "the restarted proxy never got ready"
            time.sleep(0.05)
        address = json.loads(ready.read_text())["address"]
        assert f"reclaimed {left} requests" in (tmp_path / "proxy-2.log").read_text()
        wait_until_idle(stack, ["prefill-0", "decode-0"], timeout=60)  # table, pool, instances
        assert not instance_status(stack, "decode-0").running  # nothing was dispatched again
        with grpc.insecure_channel(address) as channel:
            responses = stream(inference_pb2_grpc.InferenceStub(channel), MODELS[0], "after the restart", 8)
        assert sum(len(r.token_ids) for r in responses) == 8
        wait_until_idle(stack, ["prefill-0", "decode-0"], timeout=60)
    finally:
        restarted.terminate()
        assert restarted.wait(30) == 0
        log.close()
