"""The native launcher: the compose stack as local processes on 127.0.0.1 (`tokenpool up`).

    kvtransfer-0  ->  prefill-0..P-1, decode-0..D-1 (in parallel)  ->  proxy  ->  gateway

Each service is its own process (`python -m tokenpool.<service>`), started in that order
because each needs the addresses of the ones before it; a service announces its address
in a ready file, with its Prometheus endpoint (every service gets one, on a free port).
With a trace endpoint, every service exports its spans there over OTLP (the OTEL_*
variables are set for it). Logs go to one file per service. A stack file under the node's private
shared-memory folder names every address, for `tokenpool status`. stop() sends SIGTERM in
reverse order and SIGKILLs what does not exit.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenpool.cli.internal_tls import ENVS as INTERNAL_TLS_ENVS
from tokenpool.cli.internal_tls import InternalTLS
from tokenpool.cli.internal_token import ENV as INTERNAL_TOKEN_ENV
from tokenpool.cli.internal_token import is_loopback
from tokenpool.cli.service_process import EXIT_WITH_PARENT, stop_process
from tokenpool.decode_svc.quota import DEFAULT_QMAX_S
from tokenpool.engine.private_shm import private_dir, shm_root
from tokenpool.engine.turn_policy import check_policy
from tokenpool.kvtransfer.lease import DEFAULT_LEASE_S

START_TIMEOUT_S = 300.0  # SmolLM2's first registration reads and converts ~0.5 GB
STOP_TIMEOUT_S = 15.0
INTERNAL_TLS_FIELDS = ("internal_tls_cert", "internal_tls_key", "internal_tls_ca")


@dataclass(frozen=True)
class StackConfig:
    """What `tokenpool up` starts.

    models: model id -> folder (every instance registers all of them).
    prefill, decode: instance counts (>= 1 each).
    host, port: where the proxy listens (port 0 picks one); internal services use free ports.
    dtype, kv_mib, host_kv_mib, threads, device: per instance, as for `tokenpool serve`
      (threads None: the machine's cores shared out among the instances).
    engine: the model backend every instance computes with: native or vllm (engine/model_backend.py;
      one for all instances: a KV block's interior is the backend's, and hand-offs move bytes).
    pool_mib: the node's hand-off pool (kvtransfer agent).
    table_slots: the request table's size (requests in flight at most).
    table_backend, redis_url: where the request table lives: "shm" (the node's shared memory) or
      "redis" (the server at redis_url); the proxy and every instance are given the same, so the
      instances' progress lands in the proxy's table either way. The launcher deletes a Redis
      table when it stops (its name, the stack's, is this launcher's alone).
    policy: aegaeon, static or request (every service gets it).
    tbt_ms, qmax_s: the decode instances' TBT target (None: scaled from their measured step)
      and longest quota (aegaeon).
    trace_endpoint: an OTLP gRPC endpoint (http://host:4317) every service sends its spans to;
      None: the services trace only if the environment's OTEL_* variables say so.
    nodes: 1, or 2 to exercise the cross-node path on one machine: two "nodes", each its own
      kvtransfer agent and pool (NIXL data plane between them) and host model cache (node 1's
      beside node 0's, suffixed -node-1), prefill instances on node 0, decode instances on node 1.
    kv_streaming: prefill instances stream each layer's KV out while later layers compute.
    kv_stall_s: (nodes 2) a cross-node transfer without progress this long is failed and freed.
    kv_lease_s: a handed-off KV handle whose receiver stops renewing it is freed after this long.
    internal_token: services authenticate each other with a random token (cli/internal_token.py),
      written 0600 in the node's private folder for the stack's life; always on when host is not
      loopback (internal services then listen there too).
    internal_tls_cert, internal_tls_key, internal_tls_ca: mutual TLS between the services
      (cli/internal_tls.py): every service gets the three files; the certificate's names must
      cover host (127.0.0.1 by default). All three or none; checked before anything starts.
    tls_cert, tls_key, tls_client_ca, auth_token_file: the public API's TLS, mutual TLS and
      bearer token (cli/server_security.py); internal services stay on loopback without them.
    catalogue, host_cache_mib, host_cache_dir: serve every model folder under catalogue (weights
      read from disk on first use, engine/model_tiers.py) beside `models`, with a host model cache
      of host_cache_mib (it may hold a fraction of the catalogue) in host_cache_dir; slot_mib sizes
      the arena's model slots (default: the largest model at start) so larger ones can be added;
      load_wait_s bounds a disk load's wait for host-cache room held by busy models.
    admin_token_file: the proxy's admin service (tokenpool.v1.Admin) takes calls with this token;
      without it the catalogue cannot change while the stack runs.
    gateway, gateway_port: start the OpenAI-compatible HTTP gateway (gateway/) on host:gateway_port
      (0 picks one) in front of the proxy; it gets the same bearer token file, and with TLS serves
      HTTPS with the proxy's certificate and trusts it to reach the proxy (so a self-signed one, or
      a chain file that holds its root). Off by default here; `tokenpool up` turns it on.
    """

    models: dict[str, Path]
    prefill: int = 1
    decode: int = 2
    host: str = "127.0.0.1"
    port: int = 50051
    dtype: str = "auto"
    kv_mib: int = 64
    host_kv_mib: int = 256
    pool_mib: int = 256
    threads: int | None = None
    device: str = "cpu"
    engine: str = "native"
    table_slots: int = 1024
    table_backend: str = "shm"
    redis_url: str | None = None
    policy: str = "aegaeon"
    tbt_ms: float | None = None
    qmax_s: float = DEFAULT_QMAX_S
    trace_endpoint: str | None = None
    nodes: int = 1
    kv_streaming: bool = True
    kv_stall_s: float = 30.0
    kv_lease_s: float = DEFAULT_LEASE_S
    internal_token: bool = False
    internal_tls_cert: Path | None = None  # mutual TLS between services: each one's certificate (PEM),
    internal_tls_key: Path | None = None  # its key (0600),
    internal_tls_ca: Path | None = None  # and the CA that signed it
    tls_cert: Path | None = None  # the proxy's public port: TLS certificate chain and key (PEM)
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: clients need a certificate this CA signed
    auth_token_file: Path | None = None  # clients need "authorization: Bearer <token>" (health exempt)
    gateway: bool = False
    gateway_port: int = 8000
    catalogue: Path | None = None  # every model folder under it, registered lazily on every instance
    host_cache_mib: int | None = None  # the node's host model cache capacity (None: 8 GiB)
    slot_mib: int | None = None  # each arena model slot (None: the largest model at start)
    host_cache_dir: Path | None = None  # the host model cache's folder (None: the node's shared one)
    admin_token_file: Path | None = None  # opens the proxy's admin service (cli/admin_token.py)
    load_wait_s: float | None = None  # a disk load's wait for host-cache room (None: the instances' 120 s)

    def __post_init__(self) -> None:
        if self.nodes not in (1, 2):
            raise ValueError(f"nodes must be 1 or 2, got {self.nodes!r}")
        if not self.kv_stall_s > 0:
            raise ValueError(f"kv_stall_s must be positive, got {self.kv_stall_s!r}")
        check_policy(self.policy)
        if self.policy == "static" and len(self.models) > min(self.prefill, self.decode):
            raise ValueError(f"the static policy pins each model to its own instances: {len(self.models)} "
                             f"models need --prefill and --decode of at least {len(self.models)}")
        if self.tbt_ms is not None and not self.tbt_ms > 0:
            raise ValueError(f"tbt_ms must be positive, got {self.tbt_ms!r}")
        if not self.qmax_s > 0:
            raise ValueError(f"qmax_s (QMAX) must be positive, got {self.qmax_s!r}")
        if not self.models and self.catalogue is None:
            raise ValueError("a stack needs at least one model (models, or a catalogue folder)")
        for name in ("host_cache_mib", "slot_mib"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.load_wait_s is not None and not self.load_wait_s >= 0:
            raise ValueError(f"load_wait_s must be >= 0, got {self.load_wait_s!r}")
        self.internal_tls()  # all three files or none, readable, the key private
        for name in ("prefill", "decode", "kv_mib", "host_kv_mib", "pool_mib", "table_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.table_backend not in ("shm", "redis"):
            raise ValueError(f"table_backend must be shm or redis, got {self.table_backend!r}")
        if (self.table_backend == "redis") != bool(self.redis_url):
            raise ValueError(f"redis_url goes with table_backend redis (redis://HOST:6379/0); got "
                             f"table_backend {self.table_backend!r} and redis_url {self.redis_url!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.engine not in ("native", "vllm"):
            raise ValueError(f"engine must be native or vllm, got {self.engine!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads!r}")
        if not 0 <= self.gateway_port < 65536:
            raise ValueError(f"gateway_port must be in [0, 65535], got {self.gateway_port!r}")
        if self.gateway and self.tls_client_ca is not None:
            raise ValueError("with mutual TLS (tls_client_ca) the gateway has no client certificate to "
                             "reach the proxy: turn the gateway off (--no-gateway)")
        if self.trace_endpoint is not None and not self.trace_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"trace_endpoint must be an http:// or https:// URL (OTLP gRPC), "
                             f"got {self.trace_endpoint!r}")

    def internal_tls_files(self) -> tuple[Path | None, Path | None, Path | None]:
        return self.internal_tls_cert, self.internal_tls_key, self.internal_tls_ca

    def internal_tls(self) -> InternalTLS | None:
        """The services' mutual TLS (read from the files), or None; ValueError naming the field."""
        files = self.internal_tls_files()
        if not any(files):
            return None
        if not all(files):
            raise ValueError("internal_tls_cert, internal_tls_key and internal_tls_ca go together "
                             "(mutual TLS between the services needs all three)")
        return InternalTLS.from_files(*files, labels=INTERNAL_TLS_FIELDS)

    @property
    def threads_per_instance(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // (self.prefill + self.decode))


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log: Path
    ready_file: Path
    info: dict = field(default_factory=dict)  # the ready file's contents
    role: str = ""
    args: list[str] = field(default_factory=list)  # its command line, for a restart

    @property
    def restartable(self) -> bool:
        """Whether restart() may start it again: the proxy (its request table outlives it: the new
        one adopts it and reclaims the dead one's rows), the gateway (stateless) and an instance (its
        sequences died with it and the proxy dispatched them again elsewhere; the proxy, wired to its
        address, sees a new incarnation there and brings it in step before it takes work). Not a
        kvtransfer agent: the node's hand-off pool, which every instance on the node maps, is its."""
        return self.role in ("proxy", "gateway", "prefill", "decode")

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.info['metrics']}/metrics"


class StackStartError(RuntimeError):
    """A service did not come up; the message holds the end of its log."""


class Stack:
    def __init__(self, config: StackConfig, log_dir: Path | None = None) -> None:
        self.config = config
        self.name = f"stack-{os.getpid()}"
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tokenpool-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []
        self.agents: list[str] = []  # each node's kvtransfer agent, node 0 first
        self.stack_file = private_dir(shm_root()) / f"{self.name}.stack.json"
        self.token_file: Path | None = None  # the internal token, while the stack runs

    @property
    def address(self) -> str:
        return self._by_role("proxy")[0].address

    @property
    def gateway_url(self) -> str | None:
        """The OpenAI-compatible API's base URL (http://HOST:PORT/v1), when the gateway runs."""
        gateway = self._by_role("gateway")
        return gateway[0].info["url"] if gateway else None

    def start(self, progress=print) -> None:
        """Start every service and wait until each serves; on failure stop what started and raise."""
        try:
            if self.config.internal_token or not is_loopback(self.config.host):
                self.token_file = _write_token(private_dir(shm_root()) / f"{self.name}.internal-token")
            agents = self._launch_wait(["kvtransfer"] * self.config.nodes, progress)
            self.agents = [a.address for a in agents]
            instances = self._launch_wait(["prefill"] * self.config.prefill + ["decode"] * self.config.decode,
                                          progress, agent=agents[0].address)
            proxy = self._launch_wait(["proxy"], progress, agent=agents[0].address, instances=instances)
            if self.config.gateway:
                self._launch_wait(["gateway"], progress, proxy=proxy[0])
        except BaseException:
            self.stop()
            raise
        self._write_stack_file()

    def stop(self) -> list[tuple[str, int]]:
        """SIGTERM in reverse start order, SIGKILL after STOP_TIMEOUT_S; -> (name, exit code) each."""
        codes = []
        for service in reversed(self.services):
            codes.append((service.name, stop_process(service.process, STOP_TIMEOUT_S)))
        if self.services:
            self._drop_table()
        self.services.clear()
        self.stack_file.unlink(missing_ok=True)
        if self.token_file is not None:
            self.token_file.unlink(missing_ok=True)
        return codes

    def dead(self) -> list[Service]:
        """Services whose process has exited."""
        return [s for s in self.services if s.process.poll() is not None]

    def restart(self, service: Service, progress=print) -> Service:
        """Start a restartable service that exited again, with its flags and on the address it had
        (clients and the gateway reconnect there); -> the new Service once it serves, in the old
        one's place. StackStartError (the new process stopped) if it does not come up."""
        if not service.restartable or service.process.poll() is None:
            raise ValueError(f"{service.name} is running or not restartable")
        args = list(service.args)
        args[args.index("--listen") + 1] = service.address  # port 0 picked one: keep it
        new = self._spawn(service.name, service.role, args, mode="a")  # the log keeps the crash
        self.services[self.services.index(service)] = new
        try:
            self._wait_ready(new)
        except StackStartError:
            stop_process(new.process, STOP_TIMEOUT_S)
            raise
        self._write_stack_file()  # before the news: whoever reads it then finds the new process
        progress(f"tokenpool: {new.name} restarted on {new.address}")
        return new

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- starting ----------------------------------------------------------------

    def _launch_wait(self, roles: list[str], progress, **context) -> list[Service]:
        counts: dict[str, int] = {}
        started = []
        for role in roles:
            index = counts[role] = counts.get(role, -1) + 1
            name = role if role in ("proxy", "gateway") else f"{role}-{index}"
            started.append(self._launch(name, role, **context))
        for service in started:
            self._wait_ready(service)
            progress(f"tokenpool: {service.name} ready on {service.address}")
        return started

    def _launch(self, name: str, role: str, agent: str | None = None,
                instances: list[Service] | None = None, proxy: Service | None = None) -> Service:
        if role == "gateway":  # its /metrics is on its own HTTP port
            args = self._gateway_args(proxy)
        else:
            args = ["--metrics-port", "0", *self._args(name, role, agent, instances or [])]
        service = self._spawn(name, role, args)
        self.services.append(service)
        return service

    def _spawn(self, name: str, role: str, args: list[str], mode: str = "w") -> Service:
        ready = self.log_dir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log = self.log_dir / f"{name}.log"
        command = [sys.executable, "-m", f"tokenpool.{_MODULES[role]}", "--ready-file", str(ready), *args]
        with open(log, mode) as out:
            # Own session: a terminal's Ctrl-C reaches only the launcher, which stops services in order.
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, env=self._env(name))
        return Service(name, process, log, ready, role=role, args=args)

    def _args(self, name: str, role: str, agent: str | None, instances: list[Service]) -> list[str]:
        c = self.config
        models = [f"--model={m}={f}" for m, f in c.models.items()]
        if role == "kvtransfer":
            return ["--name", name, "--listen", f"{c.host}:0", "--pool-mib", str(c.pool_mib),
                    "--lease-s", str(c.kv_lease_s), *self._cross_node_args(name)]
        if role == "proxy":
            wiring = [f"--{s.name.split('-')[0]}={s.name}={s.address}" for s in instances]
            return ["--listen", f"{c.host}:{c.port}", "--kvtransfer", agent, *self._table_args(),
                    "--table-slots", str(c.table_slots), "--dtype", c.dtype, "--policy", c.policy,
                    *wiring, *models, *self._catalogue_args(role), *self._node_args(instances),
                    *self._security_args()]
        if role == "decode" and c.nodes == 2:
            agent = self.agents[1]
        if role == "prefill":
            models += ["--kv-streaming", "on" if c.kv_streaming else "off"]
        quotas = ["--qmax-s", str(c.qmax_s)] + (["--tbt-ms", str(c.tbt_ms)] if c.tbt_ms else [])
        return ["--name", name, "--listen", f"{c.host}:0", "--kvtransfer", agent, *self._table_args(),
                "--dtype", c.dtype, "--kv-mib", str(c.kv_mib), "--host-kv-mib", str(c.host_kv_mib),
                "--threads", str(c.threads_per_instance), "--device", c.device, "--engine", c.engine,
                "--policy", c.policy, *models, *self._catalogue_args(role, self._node_of(name)),
                *(quotas if role == "decode" else [])]

    def _table_args(self) -> list[str]:
        """The request table, the same for the proxy (which makes it) and the instances (which report)."""
        args = ["--table", self.name, "--table-backend", self.config.table_backend]
        return args + (["--redis-url", self.config.redis_url] if self.config.redis_url else [])

    def _drop_table(self) -> None:
        """The stack's request table, once every service has stopped: a proxy removes it as it
        exits, but not one that was killed (best-effort: gone already, or Redis may be)."""
        import contextlib

        from tokenpool.proxy.request_table import make_request_table

        where = {"url": self.config.redis_url} if self.config.table_backend == "redis" else {}
        with contextlib.suppress(Exception):
            table = make_request_table(self.config.table_backend, attach=True, name=self.name, **where)
            try:
                table.unlink()
            finally:
                table.close()

    def _catalogue_args(self, role: str, node: int = 0) -> list[str]:
        """The catalogue folder (proxy and instances), host-cache size and folder (instances: node 1
        of two has a cache of its own, as another machine would), admin token (proxy)."""
        c = self.config
        args = ["--catalogue", str(c.catalogue)] if c.catalogue is not None else []
        if role == "proxy":
            return args + (["--admin-token-file", str(c.admin_token_file)] if c.admin_token_file else [])
        args += ["--host-cache-mib", str(c.host_cache_mib)] if c.host_cache_mib is not None else []
        args += ["--slot-mib", str(c.slot_mib)] if c.slot_mib is not None else []
        args += ["--load-wait-s", str(c.load_wait_s)] if c.load_wait_s is not None else []
        cache_dir = c.host_cache_dir
        if node:
            from tokenpool.engine.host_model_cache import default_root  # torch: only when needed

            root = Path(c.host_cache_dir) if c.host_cache_dir is not None else default_root()
            cache_dir = root.with_name(f"{root.name}-node-{node}")
        return args + (["--host-cache-dir", str(cache_dir)] if cache_dir is not None else [])

    def _gateway_args(self, proxy: Service) -> list[str]:
        c = self.config
        args = ["--listen", f"{c.host}:{c.gateway_port}", "--proxy", proxy.address]  # models: the proxy's
        if c.auth_token_file is not None:
            args += ["--auth-token-file", str(c.auth_token_file)]
        if c.tls_cert is not None:
            args += ["--tls-cert", str(c.tls_cert), "--tls-key", str(c.tls_key),
                     "--proxy-ca", str(c.tls_cert)]
        return args

    def _security_args(self) -> list[str]:
        """The proxy's TLS and token flags (it checks the files and refuses to start on bad ones)."""
        c = self.config
        pairs = (("--tls-cert", c.tls_cert), ("--tls-key", c.tls_key), ("--tls-client-ca", c.tls_client_ca),
                 ("--auth-token-file", c.auth_token_file))
        return [item for flag, path in pairs if path is not None for item in (flag, str(path))]

    def _cross_node_args(self, name: str) -> list[str]:
        """Two nodes: each agent serves NIXL and accepts only the other."""
        if self.config.nodes == 1:
            return []
        peer = "kvtransfer-1" if name == "kvtransfer-0" else "kvtransfer-0"
        return ["--nixl", "--allow-peer", peer, "--stall-s", str(self.config.kv_stall_s)]

    def _node_of(self, name: str) -> int:
        """Two nodes: prefill instances on node 0, decode instances on node 1."""
        return 1 if self.config.nodes == 2 and name.startswith("decode") else 0

    def _node_args(self, instances: list[Service]) -> list[str]:
        """Two nodes: where each instance runs and each node's agent, for the proxy's routing."""
        if self.config.nodes == 1:
            return []
        nodes = [f"--node={s.name}=node-{self._node_of(s.name)}" for s in instances]
        return nodes + [f"--node-agent=node-{i}={a}" for i, a in enumerate(self.agents)]

    def _env(self, name: str) -> dict[str, str]:
        env = {**os.environ, EXIT_WITH_PARENT: str(os.getpid()), "OTEL_SERVICE_NAME": name}
        for variable in INTERNAL_TLS_ENVS:
            env.pop(variable, None)  # this stack's, or none: not the launcher's own
        env.update(self._internal_tls_env())
        if self.token_file is not None:
            env[INTERNAL_TOKEN_ENV] = str(self.token_file)
        if self.config.trace_endpoint:
            env.update(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc",
                       OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=self.config.trace_endpoint)
        return env

    def _internal_tls_env(self) -> dict[str, str]:
        """The services' TLS variables, {} without internal TLS (StackConfig checked the files once,
        all three or none, so this reads none of them)."""
        if self.config.internal_tls_cert is None:
            return {}
        return dict(zip(INTERNAL_TLS_ENVS, map(str, self.config.internal_tls_files()), strict=True))

    def _wait_ready(self, service: Service) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not service.ready_file.exists():
            if service.process.poll() is not None:
                raise StackStartError(f"{service.name} exited with code {service.process.returncode} while "
                                      f"starting; the end of {service.log}:\n{_tail(service.log)}")
            if time.monotonic() > deadline:
                raise StackStartError(f"{service.name} not ready after {START_TIMEOUT_S:.0f} s; "
                                      f"the end of {service.log}:\n{_tail(service.log)}")
            time.sleep(0.05)
        service.info = json.loads(service.ready_file.read_text())

    def _by_role(self, prefix: str) -> list[Service]:
        return [s for s in self.services if s.name.startswith(prefix)]

    def _write_stack_file(self) -> None:
        """Addresses of every service, for `tokenpool status` (0600, in the private folder)."""
        data = {"name": self.name, "pid": os.getpid(), "table": self.name, "logs": str(self.log_dir),
                "table_backend": self.config.table_backend, "redis_url": self.config.redis_url,
                "internal_token_file": str(self.token_file) if self.token_file else None,
                "internal_tls": self._internal_tls_env() or None,
                "services": [{"name": s.name, "address": s.address, "pid": s.process.pid,
                              "metrics": s.info.get("metrics")} for s in self.services]}
        tmp = self.stack_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        tmp.replace(self.stack_file)


_MODULES = {"kvtransfer": "kvtransfer", "prefill": "prefill_svc", "decode": "decode_svc", "proxy": "proxy",
            "gateway": "gateway"}


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_token(path: Path) -> Path:
    """A fresh random token in a new file only this user can read."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path
