"""`tokenpool up` keeps its front door open: a proxy that exits (kill -9 here; a proxy fenced off a
Redis table exits 3) is started again on the same address and serves, the request table adopted;
one restart too many in the window stops the stack with a clear line. An instance that exits is
started again too, and serves once the proxy has taken it back."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
from stack_helpers import stream
from tokenpool.cli.up_command import RESTARTS
from tokenpool.engine.private_shm import shm_root
from tokenpool.protos.v1 import inference_pb2_grpc
from waiting import wait_for

MODEL = "tiny-llama"
WAIT_S = 180  # for a line of `tokenpool up`'s output: start-up or a restart, on a slow machine


def _lines(process: subprocess.Popen) -> queue.Queue:
    """Every line `tokenpool up` writes (stdout and stderr together), as it writes it."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _until(lines: queue.Queue, needle: str, seen: list[str]) -> str:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        assert line is not None, f"tokenpool up ended before {needle!r}:\n" + "\n".join(seen[-30:])
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} within {WAIT_S} s:\n" + "\n".join(seen[-30:]))


def _proxy(up_pid: int) -> dict:
    return _service(up_pid, "proxy")


def test_a_killed_proxy_is_restarted_on_its_address_until_it_dies_too_often(tiny_dir, tmp_path):
    up = subprocess.Popen([sys.executable, "-m", "tokenpool.cli.main", "up", "--port", "0", "--no-gateway",
                           "--prefill", "1", "--decode", "1", "--threads", "1", "--model",
                           f"{MODEL}={tiny_dir / MODEL}", "--log-dir", str(tmp_path / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, seen = _lines(up), []
    try:
        _until(lines, "stack up", seen)
        first = _proxy(up.pid)
        for restart in range(1, RESTARTS + 1):
            os.kill(_proxy(up.pid)["pid"], signal.SIGKILL)
            _until(lines, "proxy exited with code -9", seen)
            line = _until(lines, "proxy restarted on", seen)
            assert line.endswith(first["address"]), line  # the same address: clients reconnect there
            proxy = _proxy(up.pid)  # the stack file names the new process
            assert proxy["pid"] != first["pid"] and proxy["address"] == first["address"]
            with grpc.insecure_channel(first["address"]) as channel:
                grpc.channel_ready_future(channel).result(timeout=30)
                stub = inference_pb2_grpc.InferenceStub(channel)
                responses = stream(stub, MODEL, f"after restart {restart}", 6)
            assert sum(len(r.token_ids) for r in responses) == 6
        os.kill(_proxy(up.pid)["pid"], signal.SIGKILL)  # one more than RESTARTS within the window
        _until(lines, f"proxy already restarted {RESTARTS} times", seen)
        assert up.wait(timeout=WAIT_S) == 1
        assert not (shm_root() / f"stack-{up.pid}.stack.json").exists()  # stopped and cleaned up
        assert not (shm_root() / f"stack-{up.pid}.reqtable").exists()  # the killed proxy's table too
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=60)


def test_a_killed_instance_is_restarted_and_serves_once_the_proxy_has_it_back(tiny_dir, tmp_path):
    """The only decode instance killed -9: `tokenpool up` starts it again on its address, the proxy
    (which lost it) sees the new process answer, takes it back, and streams complete again."""
    logs = tmp_path / "logs"
    up = subprocess.Popen([sys.executable, "-m", "tokenpool.cli.main", "up", "--port", "0", "--no-gateway",
                           "--prefill", "1", "--decode", "1", "--threads", "1", "--model",
                           f"{MODEL}={tiny_dir / MODEL}", "--log-dir", str(logs)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, seen = _lines(up), []
    try:
        _until(lines, "stack up", seen)
        decode = _service(up.pid, "decode-0")
        os.kill(decode["pid"], signal.SIGKILL)
        _until(lines, "decode-0 exited with code -9", seen)
        line = _until(lines, "decode-0 restarted on", seen)
        assert line.endswith(decode["address"]), line
        assert _service(up.pid, "decode-0")["pid"] != decode["pid"]
        rejoined = "instance decode-0 answers again; it rejoins"
        wait_for(lambda: rejoined in (logs / "proxy.log").read_text(), f"no {rejoined!r}", WAIT_S, poll_s=0.2)
        with grpc.insecure_channel(_service(up.pid, "proxy")["address"]) as channel:
            responses = stream(inference_pb2_grpc.InferenceStub(channel), MODEL, "after the restart", 6)
        assert sum(len(r.token_ids) for r in responses) == 6
        assert up.poll() is None  # the stack runs on
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)


def _service(up_pid: int, name: str) -> dict:
    stack = json.loads((shm_root() / f"stack-{up_pid}.stack.json").read_text())
    return next(s for s in stack["services"] if s["name"] == name)
