"""A throwaway redis-server for tests: 127.0.0.1, a free port, no persistence, stopped after."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """Start one, yield its URL; skips the test where the Debian package is not installed."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server missing: `apt-get install -y redis-server` "
                    "(./install.sh dev does it as root)")
    import redis

    port = free_port()
    server = subprocess.Popen([REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for(redis.Redis.from_url(url), server)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def _wait_for(client, server: subprocess.Popen) -> None:
    import redis

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
