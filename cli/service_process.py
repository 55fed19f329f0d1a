"""The lifecycle every tokenpool service process shares: listen, health, reflection, ready, stop.

    server = await start_grpc_server("127.0.0.1:0", [(add_XServicer_to_server, servicer)], names,
                                     metrics_port=0, registry=registry)   # /metrics, if asked
    announce_ready(ready_file, name, server.address, metrics=server.metrics_address)
    await wait_for_signal()                            # SIGINT / SIGTERM
    await server.grpc.stop(grace)

Every service answers the standard gRPC health check ("" and each of its services; the reply
names the process's incarnation, cli/incarnation.py) and server reflection, so grpcurl and
clients in other languages need no .proto files; a body that does not parse as the method's
message gets INVALID_ARGUMENT (cli/grpc_guard.py). With
tracing on (OTEL_* variables, telemetry/tracing.py; run_service sets it up) every call is
traced under its caller's W3C traceparent; with --metrics-port, a Prometheus endpoint serves
the service's registry on the gRPC server's host.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from .incarnation import IncarnationHealthServicer
from .server_security import ServerSecurity

MAX_MESSAGE_BYTES = 4 << 20  # a larger message is refused with RESOURCE_EXHAUSTED
EXIT_WITH_PARENT = "TOKENPOOL_EXIT_WITH_PARENT"
PARENT_POLL_S = 1.0


@dataclass(frozen=True)
class RunningServer:
    grpc: grpc.aio.Server
    address: str  # host:port actually bound
    health: health.aio.HealthServicer
    metrics: object | None = None  # telemetry.metrics_server.MetricsServer, when asked for

    @property
    def metrics_address(self) -> str | None:
        return self.metrics.address if self.metrics is not None else None


def add_metrics_arg(p) -> None:
    """--metrics-port, for every service's flag parser."""
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, HOST being --listen's "
                        "(0 picks a port, announced in the ready file; default: no endpoint)")


async def start_grpc_server(address: str, servicers: Iterable[tuple[Callable, object]],
                            service_names: Iterable[str], trace_roots: bool = False,
                            metrics_port: int | None = None,
                            registry: CollectorRegistry | None = None,
                            security: ServerSecurity | None = None) -> RunningServer:
    """Serve the servicers on address ('host:port'; port 0 picks one), with health and reflection.

    servicers: (add_XServicer_to_server, servicer) pairs; service_names: their full names
    (e.g. 'tokenpool.v1.Inference'), marked SERVING once the server has started.
    trace_roots: start a trace for a call that carries none (the front door; tracing on only).
    metrics_port: serve registry at http://<address's host>:metrics_port/metrics (0 picks one).
    security: TLS and a bearer token (cli/server_security.py); None: plaintext, no token.
    """
    from tokenpool.telemetry.grpc_tracing import server_interceptors

    from .grpc_guard import MalformedRequestGuard

    security = security or ServerSecurity()
    server = grpc.aio.server(interceptors=[*security.interceptors(), MalformedRequestGuard(),
                                           *server_interceptors(trace_roots)],
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    for add, servicer in servicers:
        add(servicer, server)
    health_servicer = IncarnationHealthServicer()  # names this process: a restart shows
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((*names, health_name, reflection.SERVICE_NAME), server)
    credentials = security.credentials()
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = address.rpartition(":")[0] or "127.0.0.1"
    metrics = None
    if metrics_port is not None:
        from tokenpool.telemetry.metrics_server import start_metrics_server

        try:
            metrics = start_metrics_server(host, metrics_port, registry or CollectorRegistry())
        except BaseException:
            await server.stop(None)
            raise
    return RunningServer(server, f"{host}:{port}", health_servicer, metrics)


def announce_ready(ready_file: Path | None, name: str, address: str, **extra) -> None:
    """Tell the launcher where this service listens: a JSON file written whole (rename), or a line."""
    if ready_file is None:
        print(f"tokenpool: {name} listening on {address}", flush=True)
        return
    tmp = ready_file.with_name(ready_file.name + ".tmp")
    tmp.write_text(json.dumps({"name": name, "address": address, "pid": os.getpid(), **extra}))
    tmp.replace(ready_file)


def run_service(serve: Coroutine, name: str) -> int:
    """Run a service's serve() coroutine on uvloop -> exit status: the int serve() returned (a
    service that must be restarted says so), else 0; or 1 with one line naming why it could not
    serve (a port taken, a bad model folder, no room in /dev/shm...)."""
    import uvloop
    from tokenpool.telemetry import tracing

    try:
        tracing.configure(name)  # from the OTEL_* variables; installs nothing when they ask for none
        status = uvloop.run(serve)
    except (OSError, ValueError, MemoryError, RuntimeError) as exc:
        serve.close()  # not started if tracing's settings were refused
        print(f"tokenpool: {name}: cannot serve: {exc}", file=sys.stderr)
        return 1
    finally:
        tracing.shutdown()  # flush the last spans (bounded)
    return status if isinstance(status, int) else 0


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM (the launcher's and Ctrl-C's way to stop a service), or, when
    the launcher set TOKENPOOL_EXIT_WITH_PARENT to its pid, once the launcher is gone (even
    SIGKILLed, and even before this service got here: the pid is the launcher's, not whatever
    parent the service has by now)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: all stacks to stderr
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watch = None
    parent = launcher_pid()
    if parent is not None:
        watch = asyncio.create_task(_watch_parent(parent, stop))
    try:
        await stop.wait()
    finally:
        if watch is not None:
            watch.cancel()


def launcher_pid() -> int | None:
    """The pid in TOKENPOOL_EXIT_WITH_PARENT (None when unset), taken out of the environment so
    processes this one starts do not watch this one's launcher."""
    value = os.environ.pop(EXIT_WITH_PARENT, None)
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{EXIT_WITH_PARENT} must be the launching process's pid, got {value!r}")
    return int(value)


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent:  # an orphan is re-parented (to init or a subreaper)
        await asyncio.sleep(PARENT_POLL_S)
    stop.set()


def stop_process(process: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM (if still running), SIGKILL after grace_s -> its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
