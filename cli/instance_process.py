"""A prefill or decode instance as its own process (`python -m tokenpool.prefill_svc ...`).

    python -m tokenpool.decode_svc --name decode-0 --listen 127.0.0.1:0 \\
        --kvtransfer 127.0.0.1:7000 --model tiny-llama=/path/to/tiny-llama [--table stack-1 \\
        [--table-backend redis --redis-url redis://HOST:6379/0]] [--ready-file F]

The instance registers every model (the node's host model cache reads each once; other
instances attach), connects to the node's kvtransfer agent, reports progress into the
proxies' request table if named (the node's shared-memory one, or one in Redis on any host;
attached once a proxy has made it, written by a thread of its own), and serves until
SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from tokenpool.decode_svc.quota import DEFAULT_QMAX_S
from tokenpool.engine.step_profiler import InstanceTimings, measure_kv_swaps
from tokenpool.engine.turn_policy import POLICIES
from tokenpool.prefill_svc.prefill_scheduler import MAX_GROUP_SIZE

from .instance_setup import add_engine_args, build_engine, parse_models
from .service_process import add_metrics_arg, run_service
from .table_args import add_table_backend_args, attach_options

ROLES = ("prefill", "decode")
DRAIN_GRACE_S = 5.0  # SIGTERM: in-flight work gets this long; the proxy moves the rest elsewhere
DRAIN_NOTICE_S = 0.6  # of which NOT_SERVING is announced before new calls are refused (> a probe)


def build_parser(role: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m tokenpool.{role}_svc", description=f"a {role} instance")
    p.add_argument("--name", default=f"{role}-0", help="instance name in logs, status and the request table")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0 picks one)")
    p.add_argument("--model", action="append", default=[], metavar="ID[=FOLDER]",
                   help="a model to register: a folder, or a model in the store (repeatable; or --catalogue)")
    p.add_argument("--kvtransfer", required=True, metavar="HOST:PORT", help="the node's kvtransfer agent")
    p.add_argument("--table", default=None,
                   help="the proxies' request table to report progress in (their --table; with redis, "
                        "their --table-backend and --redis-url too)")
    add_table_backend_args(p)
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write {name, address, pid} here once serving (for launchers)")
    add_engine_args(p, kv_mib=64, host_kv_mib=256)
    p.add_argument("--drain-s", type=float, default=DRAIN_GRACE_S,
                   help="on SIGTERM, how long work in flight may take to finish (the rest moves elsewhere)")
    p.add_argument("--policy", choices=POLICIES, default="aegaeon",
                   help="scheduling: aegaeon (grouped-FCFS prefill, weighted round-robin decode), "
                        "static (one model per instance) or request (request-level scaling)")
    if role == "prefill":
        p.add_argument("--kv-streaming", choices=("on", "off"), default="on",
                       help="on: each layer's KV leaves while later layers compute; off: all of it after")
    if role == "decode":
        p.add_argument("--tbt-ms", type=float, default=None,
                       help="TBT target (default: 4x the slowest model's single-sequence step here)")
        p.add_argument("--qmax-s", type=float, default=DEFAULT_QMAX_S, help="longest time quota of a turn")
    add_metrics_arg(p)
    return p


async def serve(role: str, args: argparse.Namespace) -> None:
    from prometheus_client import CollectorRegistry
    from tokenpool.kvtransfer.transport import make_transport
    from tokenpool.protos.internal.v1 import instances_pb2_grpc
    from tokenpool.telemetry.instance_metrics import InstanceMetrics

    from . import internal_token
    from .service_process import announce_ready, start_grpc_server, wait_for_signal

    if not args.drain_s >= 0:
        raise ValueError(f"--drain-s must be >= 0 seconds, got {args.drain_s!r}")
    table = attach_options(args) if args.table else None  # a bad flag fails before the models load
    internal_token.check_listen(args.listen)
    stop = asyncio.create_task(wait_for_signal())  # a signal during start-up still shuts down cleanly
    await asyncio.sleep(0)
    engine = build_engine(args, parse_models(args.model), in_fleet=True)
    try:
        timings = InstanceTimings.measure(engine)
        if role == "decode":  # its round-robin plans each turn's KV swap-in (decode_svc/decode_scheduler.py)
            timings.kv_swap.update(measure_kv_swaps(engine))
        policy = _decode_policy(args, timings) if role == "decode" else None  # bad settings fail here
        transport = make_transport("node-local", args.kvtransfer)
    except BaseException:
        engine.close()
        raise
    registry = CollectorRegistry()
    metrics = InstanceMetrics(registry, role, sorted(engine.models))
    progress = _progress(args.table_backend, table, registry) if table else None
    servicer, add, service = _servicer(role, args, engine, transport, timings, policy, instances_pb2_grpc,
                                       metrics, progress)
    try:
        server = await start_grpc_server(args.listen, [(add, servicer)], [service],
                                         metrics_port=args.metrics_port, registry=registry,
                                         security=internal_token.server_security())
        announce_ready(args.ready_file, args.name, server.address, role=role, models=sorted(engine.models),
                       metrics=server.metrics_address)
        await stop
        # Drain: health says NOT_SERVING (the proxy sends nothing new), new calls are refused, calls
        # in flight get the grace period; those still running then end, and the proxy re-dispatches them.
        print(f"tokenpool: {args.name} draining (up to {args.drain_s:g} s)", file=sys.stderr, flush=True)
        await server.health.enter_graceful_shutdown()
        await asyncio.sleep(min(args.drain_s, DRAIN_NOTICE_S))  # the proxy's next health probe sees it
        await server.grpc.stop(max(0.0, args.drain_s - DRAIN_NOTICE_S))
        print(f"tokenpool: {args.name} stopped", file=sys.stderr, flush=True)
    finally:
        servicer.close()
        engine.close()
        transport.close()
        if progress is not None:
            progress.close()


def _progress(backend: str, options: dict, registry):
    """The reporter of this instance's progress; it attaches the table on its own thread once a proxy
    has made it (proxies start after the instances, since they need their addresses)."""
    from tokenpool.proxy.progress_reporter import ProgressReporter
    from tokenpool.proxy.request_table import make_request_table

    return ProgressReporter(lambda: make_request_table(backend, attach=True, **options), registry,
                            name=f"{backend}:{options['name']}")


def _decode_policy(args: argparse.Namespace, timings: InstanceTimings):
    from tokenpool.decode_svc.decode_policy import make_decode_policy

    return make_decode_policy(args.policy, timings, args.tbt_ms, args.qmax_s)


def _servicer(role, args, engine, transport, timings, policy, grpc_module, metrics=None, progress=None):
    if role == "prefill":
        from tokenpool.prefill_svc.prefill_servicer import PrefillServicer

        group = MAX_GROUP_SIZE if args.policy == "aegaeon" else 1  # 1: plain FCFS for the baselines
        servicer = PrefillServicer(args.name, engine, transport, progress, timings, group, args.policy,
                                   metrics, stream_kv=args.kv_streaming == "on")
        return servicer, grpc_module.add_PrefillServicer_to_server, "tokenpool.internal.v1.Prefill"
    from tokenpool.decode_svc.decode_servicer import DecodeServicer

    servicer = DecodeServicer(args.name, engine, transport, progress, policy, args.policy, timings, metrics)
    return servicer, grpc_module.add_DecodeServicer_to_server, "tokenpool.internal.v1.Decode"


def main(role: str, argv: list[str] | None = None) -> int:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    args = build_parser(role).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(levelname)s: %(message)s")
    return run_service(serve(role, args), args.name)
