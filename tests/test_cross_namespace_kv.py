"""The cross-node KV path between two network namespaces: two "hosts" joined by a veth pair, each a
kvtransfer agent (NIXL, UCX over TCP on its veth: UCX_TLS=tcp, UCX_NET_DEVICES=<veth>) listening on
its own address (so with the internal token), and the KV a prefill on host A streams crossing to
host B's pool byte for byte as it does between two agents on loopback.

Nothing here leaves the namespaces or 127.0.0.1: the clients of each agent run in its namespace
(tests/netns_kv_node.py). The namespaces and the veth pair are deleted whatever happens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from stack_helpers import expected_streams
from tokenpool.cli.internal_token import ENV as TOKEN_ENV
from tokenpool.cli.service_process import EXIT_WITH_PARENT, stop_process

# Looked up, not imported: NIXL's bindings loaded beside grpc_tools' protoc (test_protos) crash it.
if importlib.util.find_spec("nixl") is None:
    pytest.skip("nixl is not installed", allow_module_level=True)

NODE = Path(__file__).with_name("netns_kv_node.py")
START_TIMEOUT_S = 240.0  # a bound, not an expectation: a loaded 2-core machine starts NIXL agents slowly
CALL_TIMEOUT_S = 180.0
STALL_S = 5.0
LEASE_S = 120.0  # a handle waits for its fetch while a loaded machine starts the fetching process
BLOCK_BYTES = 4 * 2 * 16 * 2 * 8 * 4  # netns_kv_node.SHAPE
SPECS = [(1, 5), (2, 1)]  # (seed, blocks) of each hand-off: several blocks in two chunks, one block


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
    dns: str  # its name in both namespaces' /etc/hosts (ip netns exec binds /etc/netns/NS/hosts)

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def env(self, token: Path) -> dict[str, str]:
        """UCX over TCP on this host's veth only, the internal token, gone with the test."""
        return {**os.environ, "UCX_TLS": "tcp", "UCX_NET_DEVICES": self.device, TOKEN_ENV: str(token),
                EXIT_WITH_PARENT: str(os.getpid())}


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Host, Host]]:
    """Two namespaces joined by a veth pair on 10.231.X.0/24 (X random), deleted at the end."""
    tag = secrets.token_hex(3)
    subnet = f"10.231.{secrets.randbelow(250) + 2}"
    a = Host(f"tp-kv-a-{tag}", f"tpa{tag}", f"{subnet}.1", "host-a")
    b = Host(f"tp-kv-b-{tag}", f"tpb{tag}", f"{subnet}.2", "host-b")
    made: list[str] = []
    etc = Path("/etc/netns")
    etc_made = not etc.exists()
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
            (etc / host.netns).mkdir(parents=True)
            (etc / host.netns / "hosts").write_text(f"127.0.0.1 localhost\n{a.ip} {a.dns}\n{b.ip} {b.dns}\n")
        yield a, b
    finally:
        for netns in made:  # takes the veth pair with it
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
            shutil.rmtree(etc / netns, ignore_errors=True)
        if etc_made:
            with contextlib.suppress(OSError):
                etc.rmdir()


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("netns-token") / "internal-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


class Service:
    """`python -m tokenpool.MODULE ARGS --ready-file F` on a host (or, host None, here on loopback)."""

    def __init__(self, tmp: Path, name: str, host: Host | None, token: Path, module: str, *args: str) -> None:
        self.ready = tmp / f"{name}.ready.json"
        self.name, self.host, self.log = name, host, tmp / f"{name}.log"
        argv = [sys.executable, "-m", f"tokenpool.{module}", *args, "--ready-file", str(self.ready)]
        env = host.env(token) if host else {**os.environ, TOKEN_ENV: str(token),
                                            EXIT_WITH_PARENT: str(os.getpid())}
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(host.command(*argv) if host else argv, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def wait_ready(self) -> Service:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready.exists():  # the service writes it (by rename) once it serves
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.address = json.loads(self.ready.read_text())["address"]
        return self

    def stop(self) -> int:
        return stop_process(self.process, 15)

    def run(self, token: Path, *args: str) -> str:
        """tests/netns_kv_node.py with args, on this agent's host -> its stdout."""
        argv = [sys.executable, str(NODE), *args]
        env = self.host.env(token) if self.host else {**os.environ, TOKEN_ENV: str(token)}
        result = subprocess.run(self.host.command(*argv) if self.host else argv, capture_output=True,
                                text=True, env=env, timeout=CALL_TIMEOUT_S)
        assert result.returncode == 0, f"{args[0]} on {self.name}: {result.stderr}\n{self.log.read_text()}"
        return result.stdout


class Agent(Service):
    """`python -m tokenpool.kvtransfer --nixl` on a host (or, host None, on loopback here)."""

    def __init__(self, tmp: Path, name: str, peer: str, host: Host | None, token: Path) -> None:
        listen = f"{host.ip}:0" if host else "127.0.0.1:0"
        super().__init__(tmp, name, host, token, "kvtransfer", "--name", name, "--listen", listen,
                         "--pool-mib", "8", "--slab-mib", "1", "--nixl", "--allow-peer", peer,
                         "--stall-s", str(STALL_S), "--lease-s", str(LEASE_S))



@pytest.fixture(scope="module")
def all_agents(hosts, token, tmp_path_factory) -> Iterator[tuple[Agent, ...]]:
    """A pair on the two hosts and a pair on loopback here, all started at once."""
    tmp = tmp_path_factory.mktemp("agents")
    started: list[Agent] = []
    try:
        for tag, host in (("a", hosts[0]), ("b", hosts[1]), ("a", None), ("b", None)):
            folder = tmp / ("netns" if host else "loopback")
            folder.mkdir(exist_ok=True)
            peer = "kvtransfer-b" if tag == "a" else "kvtransfer-a"
            started.append(Agent(folder, f"kvtransfer-{tag}", peer, host, token))
        for agent in started:
            agent.wait_ready()
        yield tuple(started)
    finally:
        codes = [agent.stop() for agent in started]
    assert codes == [0] * 4, codes


@pytest.fixture(scope="module")
def agents(all_agents) -> tuple[Agent, Agent]:
    return all_agents[0], all_agents[1]


@pytest.fixture(scope="module")
def loopback_agents(all_agents) -> tuple[Agent, Agent]:
    return all_agents[2], all_agents[3]


def _hand_off(a: Agent, b: Agent, token: Path, out: Path) -> list[dict]:
    """send SPECS on a's host with b as the destination, fetch on b's host -> the handles; bytes in out."""
    handles = json.loads(a.run(token, "send", a.address, b.address, json.dumps(SPECS)))
    out.mkdir()
    b.run(token, "fetch", b.address, json.dumps(handles), str(out))
    return handles


def _expected_bytes(seed: int, num_blocks: int) -> bytes:
    sys.path.insert(0, str(NODE.parent))
    from netns_kv_node import block_ids, device_kv

    kv = device_kv(seed)
    return b"".join(kv[:, :, i].contiguous().numpy().tobytes() for i in block_ids(num_blocks))


def test_the_agents_listen_on_their_veth_addresses(hosts, agents):
    for host, agent in zip(hosts, agents, strict=True):
        assert agent.address.startswith(host.ip + ":")


def test_kv_crosses_namespaces_byte_exact_as_on_loopback(hosts, agents, loopback_agents, token, tmp_path):
    a, b = agents
    crossed = _hand_off(a, b, token, tmp_path / "netns")
    looped = _hand_off(*loopback_agents, token, tmp_path / "loopback")
    for (seed, num_blocks), handle, other in zip(SPECS, crossed, looped, strict=True):
        assert handle["agent"] == b.address  # the KV now lies in host B's pool, where B's decode reads it
        assert other["agent"] == loopback_agents[1].address
        # Over NIXL, the same bytes both ways (the block both chunks touch goes twice).
        assert handle["pushed_bytes"] == other["pushed_bytes"] >= num_blocks * BLOCK_BYTES
        name = f"{seed}.bin"
        assert ((tmp_path / "netns" / name).read_bytes() == (tmp_path / "loopback" / name).read_bytes()
                == _expected_bytes(seed, num_blocks))
    # B registered A over the veth: A's control address is on host A's subnet, not loopback.
    assert f"registered peer kvtransfer-a at {hosts[0].ip}:" in b.log.read_text()


# -- the stack across the namespaces: prefill and proxy on host A, decode on host B -------------------

MODELS = ("tiny-llama", "tiny-qwen2")
JOBS = [(MODELS[i % 2], prompt, 8) for i, prompt in enumerate(
    ("The quick brown fox", "Numbers 12345 and more",
     "A prompt long enough to need more than one block of sixteen tokens in the paged KV cache."))]


@pytest.fixture(scope="module")
def stack(hosts, agents, token, tiny_dir, tmp_path_factory) -> Iterator[Service]:
    """Instances and proxy find each other by DNS names (the namespaces' /etc/hosts) and ports only:
    each instance is given its host's agent, the proxy every instance and agent and which host each
    is on. The agents call themselves by IP address, not by these names. Only host A's prefill
    reports to the proxy's request table (shared memory on host A); host B's decode has none."""
    a, b = hosts
    agent_a, agent_b = agents

    def named(host: Host, service: Service) -> str:
        return f"{host.dns}:{service.address.rpartition(':')[2]}"

    tmp = tmp_path_factory.mktemp("netns-stack")
    table = f"netns-{secrets.token_hex(4)}"
    models = [f"--model={m}={tiny_dir / m}" for m in MODELS]
    engine = ["--dtype", "float32", "--kv-mib", "8", "--host-kv-mib", "32", "--threads", "1", *models]
    started: list[Service] = []
    try:
        started.append(Service(tmp, "prefill-0", a, token, "prefill_svc", "--name", "prefill-0", "--listen",
                               f"{a.ip}:0", "--kvtransfer", named(a, agent_a), "--table", table, *engine))
        started.append(Service(tmp, "decode-0", b, token, "decode_svc", "--name", "decode-0", "--listen",
                               f"{b.ip}:0", "--kvtransfer", named(b, agent_b), *engine))
        prefill, decode = (s.wait_ready() for s in started)
        started.append(Service(tmp, "proxy", a, token, "proxy", "--listen", "127.0.0.1:0", "--kvtransfer",
                               named(a, agent_a), "--prefill", f"prefill-0={named(a, prefill)}", "--decode",
                               f"decode-0={named(b, decode)}", "--node", "prefill-0=host-a", "--node",
                               "decode-0=host-b", "--node-agent", f"host-a={named(a, agent_a)}",
                               "--node-agent", f"host-b={named(b, agent_b)}", "--table", table,
                               "--table-slots", "16", "--dtype", "float32", *models))
        yield started[-1].wait_ready()
    finally:
        for service in reversed(started):
            service.stop()


def test_prefill_on_one_namespace_and_decode_on_another_give_the_engines_greedy_tokens(stack, agents, token,
                                                                                      tiny_dir):
    agent_a, agent_b = agents
    expected = expected_streams(tiny_dir, JOBS)  # what the loopback stacks give (test_cross_node_stack)
    got = json.loads(stack.run(token, "generate", stack.address, json.dumps(JOBS)))  # a client on host A
    for job, tokens in zip(JOBS, got, strict=True):
        assert tokens == expected[job][0], job
    # Every prompt's KV crossed to host B over the veth, and neither pool holds anything now.
    assert f"registered peer kvtransfer-a at {agent_a.address}" in agent_b.log.read_text()
    for agent in agents:
        assert json.loads(agent.run(token, "stats", agent.address))["handles"] == 0


def test_an_agent_bound_to_a_wildcard_names_itself_apart():
    from tokenpool.kvtransfer.__main__ import advertised_address

    host = socket.gethostname()
    assert advertised_address(None, "0.0.0.0:7000") == advertised_address(None, "[::]:7000") == f"{host}:7000"
    assert advertised_address(None, "10.231.3.2:7000") == "10.231.3.2:7000"
    assert advertised_address("kvtransfer-node-1", "0.0.0.0:7000") == "kvtransfer-node-1:7000"
    assert advertised_address("kvtransfer-node-1:7100", "0.0.0.0:7000") == "kvtransfer-node-1:7100"
