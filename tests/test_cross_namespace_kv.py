"""The cross-node KV path between two network namespaces: two "hosts" joined by a veth pair, each a
kvtransfer agent (NIXL, UCX over TCP on its veth: UCX_TLS=tcp, UCX_NET_DEVICES=<veth>) listening on
its own address (so with the internal token), and the KV a prefill on host A streams crossing to
host B's pool byte for byte as it does between two agents on loopback.

Nothing here leaves the namespaces or 127.0.0.1: the clients of each agent run in its namespace
(tests/netns_kv_node.py). The namespaces and the veth pair are deleted whatever happens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenpool.cli.internal_token import ENV as TOKEN_ENV
from tokenpool.cli.service_process import EXIT_WITH_PARENT, stop_process

# Looked up, not imported: NIXL's bindings loaded beside grpc_tools' protoc (test_protos) crash it.
if importlib.util.find_spec("nixl") is None:
    pytest.skip("nixl is not installed", allow_module_level=True)

NODE = Path(__file__).with_name("netns_kv_node.py")
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 60.0
STALL_S = 5.0


def _namespaces_missing() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    return None


if (why := _namespaces_missing()) is not None:
    pytest.skip(why, allow_module_level=True)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    """One side of the veth pair: its namespace, interface and address."""

    netns: str
    device: str
    ip: str

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def env(self, token: Path) -> dict[str, str]:
        """UCX over TCP on this host's veth only, the internal token, gone with the test."""
        return {**os.environ, "UCX_TLS": "tcp", "UCX_NET_DEVICES": self.device, TOKEN_ENV: str(token),
                EXIT_WITH_PARENT: "1"}


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Host, Host]]:
    """Two namespaces joined by a veth pair on 10.231.X.0/24 (X random), deleted at the end."""
    tag = secrets.token_hex(3)
    subnet = f"10.231.{secrets.randbelow(250) + 2}"
    a = Host(f"tp-kv-a-{tag}", f"tpa{tag}", f"{subnet}.1")
    b = Host(f"tp-kv-b-{tag}", f"tpb{tag}", f"{subnet}.2")
    made: list[str] = []
    try:
        for host in (a, b):
            try:
                _ip("netns", "add", host.netns)
            except RuntimeError as exc:
                if not made:
                    pytest.skip(f"network namespaces cannot be created here: {exc}")
                raise
            made.append(host.netns)
        _ip("link", "add", a.device, "type", "veth", "peer", "name", b.device)
        for host in (a, b):
            _ip("link", "set", host.device, "netns", host.netns)
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", host.device)
            _ip("-n", host.netns, "link", "set", host.device, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for netns in made:  # takes the veth pair with it
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("netns-token") / "internal-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


class Agent:
    """`python -m tokenpool.kvtransfer --nixl` on a host (or, host None, on loopback here)."""

    def __init__(self, tmp: Path, name: str, peer: str, host: Host | None, token: Path) -> None:
        ready = tmp / f"{name}.ready.json"
        self.name, self.host, self.log = name, host, tmp / f"{name}.log"
        listen = f"{host.ip}:0" if host else "127.0.0.1:0"
        argv = [sys.executable, "-m", "tokenpool.kvtransfer", "--name", name, "--listen", listen,
                "--pool-mib", "8", "--slab-mib", "1", "--nixl", "--allow-peer", peer,
                "--stall-s", str(STALL_S), "--ready-file", str(ready)]
        env = host.env(token) if host else {**os.environ, TOKEN_ENV: str(token), EXIT_WITH_PARENT: "1"}
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(host.command(*argv) if host else argv, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():  # the agent writes it (by rename) once it serves
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.address = json.loads(ready.read_text())["address"]

    def run(self, token: Path, *args: str) -> str:
        """tests/netns_kv_node.py with args, on this agent's host -> its stdout."""
        argv = [sys.executable, str(NODE), *args]
        env = self.host.env(token) if self.host else {**os.environ, TOKEN_ENV: str(token)}
        result = subprocess.run(self.host.command(*argv) if self.host else argv, capture_output=True,
                                text=True, env=env, timeout=CALL_TIMEOUT_S)
        assert result.returncode == 0, f"{args[0]} on {self.name}: {result.stderr}\n{self.log.read_text()}"
        return result.stdout

    def stop(self) -> int:
        return stop_process(self.process, 15)


def _pair(tmp: Path, a_host: Host | None, b_host: Host | None, token: Path) -> tuple[Agent, Agent]:
    a = Agent(tmp, "kvtransfer-a", "kvtransfer-b", a_host, token)
    try:
        return a, Agent(tmp, "kvtransfer-b", "kvtransfer-a", b_host, token)
    except BaseException:
        a.stop()
        raise


@pytest.fixture(scope="module")
def agents(hosts, token, tmp_path_factory) -> Iterator[tuple[Agent, Agent]]:
    a, b = _pair(tmp_path_factory.mktemp("netns-agents"), *hosts, token)
    yield a, b
    assert (a.stop(), b.stop()) == (0, 0), a.log.read_text() + b.log.read_text()


@pytest.fixture(scope="module")
def loopback_agents(token, tmp_path_factory) -> Iterator[tuple[Agent, Agent]]:
    a, b = _pair(tmp_path_factory.mktemp("loopback-agents"), None, None, token)
    yield a, b
    a.stop()
    b.stop()


def _hand_off(a: Agent, b: Agent, token: Path, seed: int, num_blocks: int, out: Path) -> dict:
    """send on a's host with b as the destination, fetch on b's host -> the handle; bytes in out."""
    handle = json.loads(a.run(token, "send", a.address, b.address, str(seed), str(num_blocks)))
    b.run(token, "fetch", b.address, json.dumps(handle), str(out))
    return handle


def _expected_bytes(seed: int, num_blocks: int) -> bytes:
    sys.path.insert(0, str(NODE.parent))
    from netns_kv_node import block_ids, device_kv

    kv = device_kv(seed)
    return b"".join(kv[:, :, i].contiguous().numpy().tobytes() for i in block_ids(num_blocks))


def test_the_agents_listen_on_their_veth_addresses(hosts, agents):
    for host, agent in zip(hosts, agents, strict=True):
        assert agent.address.startswith(host.ip + ":")


@pytest.mark.parametrize("seed, num_blocks", [(1, 5), (2, 1)])
def test_kv_crosses_namespaces_byte_exact_as_on_loopback(hosts, agents, loopback_agents, token, tmp_path,
                                                       seed, num_blocks):
    a, b = agents
    handle = _hand_off(a, b, token, seed, num_blocks, tmp_path / "netns.bin")
    assert handle["agent"] == b.address  # the KV now lies in host B's pool, where B's decode reads it
    assert handle["pushed_bytes"] >= num_blocks * 4 * 2 * 16 * 2 * 8 * 4  # it went over NIXL
    looped = _hand_off(*loopback_agents, token, seed, num_blocks, tmp_path / "loopback.bin")
    assert looped["agent"] == loopback_agents[1].address
    crossed, local = (tmp_path / "netns.bin").read_bytes(), (tmp_path / "loopback.bin").read_bytes()
    assert crossed == local == _expected_bytes(seed, num_blocks)
    # B registered A over the veth: A's control address is on host A's subnet, not loopback.
    assert f"registered peer kvtransfer-a at {hosts[0].ip}:" in b.log.read_text()
