"""`python -m tokenpool.proxy`: the front door of a disaggregated stack (flags: --help).

    python -m tokenpool.proxy --listen 127.0.0.1:50051 --kvtransfer 127.0.0.1:7000 \\
        --prefill prefill-0=127.0.0.1:7001 --decode decode-0=127.0.0.1:7002 \\
        --model tiny-llama=/path/to/tiny-llama --table stack-1

Creates the node's request table (instances attach it by name), serves tokenpool.v1.Inference
with health and reflection, and removes the table on SIGINT/SIGTERM. A table left by a proxy
that died is adopted, and its rows reclaimed (proxy/table_recovery.py). A proxy fenced by a
shared table (its heartbeat lapsed: it can never write again) stops serving and exits with
EXIT_FENCED, for its supervisor to start a fresh one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from tokenpool.cli.server_security import ServerSecurity, add_security_args
from tokenpool.cli.service_process import add_metrics_arg
from tokenpool.cli.table_args import add_table_backend_args
from tokenpool.engine.turn_policy import POLICIES

from .stop_serving import STOP_GRACE_S, stop_serving

FENCE_POLL_S = 0.5  # table.fenced is a flag: polling it costs nothing
FENCED_NOTICE_S = 2.0  # fenced: NOT_SERVING, new calls refused naming the fence, then the port closes
EXIT_FENCED = 3  # the exit status of a fenced proxy: Kubernetes (or any supervisor) starts a fresh one
TTFT_PER_TBT = 100.0  # the paper's SLO: 10 s TTFT over 100 ms TBT
DEFAULT_TBT_S = 0.1
SLO_POLL_S = 1.0

log = logging.getLogger("tokenpool.proxy")


def _named_address(text: str) -> tuple[str, str]:
    name, _, address = text.partition("=")
    if not name or ":" not in address:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    return name, address


def _pair(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenpool.proxy", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:50051", help="host:port (port 0 picks one)")
    add_security_args(p)  # TLS and a bearer token for the public API
    p.add_argument("--prefill", action="append", type=_named_address, required=True, metavar="NAME=ADDR")
    p.add_argument("--decode", action="append", type=_named_address, required=True, metavar="NAME=ADDR")
    p.add_argument("--kvtransfer", required=True, metavar="HOST:PORT", help="the node's kvtransfer agent")
    p.add_argument("--node", action="append", default=[], type=_pair, metavar="INSTANCE=NODE",
                   help="the node an instance runs on (repeatable; default: all on --kvtransfer's)")
    p.add_argument("--node-agent", action="append", default=[], type=_named_address, metavar="NODE=ADDR",
                   help="a node's kvtransfer agent (repeatable): KV crosses nodes through the agents")
    p.add_argument("--model", action="append", default=[], metavar="ID[=FOLDER]",
                   help="a served model: its tokenizer and limits (repeatable; or --catalogue)")
    p.add_argument("--catalogue", type=Path, default=None, metavar="DIR",
                   help="serve every model folder under DIR (as the instances were given)")
    p.add_argument("--admin-token-file", type=Path, default=None, metavar="FILE",
                   help="open the admin service (tokenpool.v1.Admin: add/remove/evict/preload models) to "
                        "calls with 'authorization: Bearer <the file's first line>'; without it every admin "
                        "call is refused")
    p.add_argument("--dtype", default="auto", help="as the instances were given (for weight sizes)")
    p.add_argument("--table", default=f"proxy-{os.getpid()}", help="name of the request table to create")
    add_table_backend_args(p)
    p.add_argument("--table-slots", type=int, default=1024,
                   help="requests in flight at most (more get RESOURCE_EXHAUSTED)")
    p.add_argument("--policy", choices=POLICIES, default="aegaeon",
                   help="dispatch: aegaeon (grouped FCFS, batch co-location), static (model i on "
                        "instance i), request (request-level scaling)")
    p.add_argument("--ready-file", type=Path, default=None)
    p.add_argument("--slo-tbt-ms", type=float, default=None,
                   help="TBT target attainment is scored against (default: the decode instances')")
    p.add_argument("--slo-ttft-s", type=float, default=None,
                   help="TTFT target attainment is scored against (default: 100 x the TBT target, "
                        "the paper's 10 s over 100 ms)")
    add_metrics_arg(p)
    return p


async def serve(args: argparse.Namespace) -> int | None:
    """Serve until SIGINT/SIGTERM (-> None, exit 0) or until the table fences this proxy (-> EXIT_FENCED)."""
    from prometheus_client import CollectorRegistry
    from tokenpool.cli.admin_token import AdminGuard, read_admin_token
    from tokenpool.cli.instance_setup import catalogue_models, parse_models
    from tokenpool.cli.service_process import announce_ready, start_grpc_server, wait_for_signal
    from tokenpool.protos.v1 import admin_pb2_grpc, inference_pb2_grpc
    from tokenpool.telemetry.proxy_metrics import ProxyMetrics

    from .admin_servicer import AdminServicer
    from .dispatcher import make_dispatcher
    from .fleet_backend import MAX_ATTEMPTS, FleetBackend
    from .inference_servicer import InferenceServicer
    from .request_table import make_request_table
    from .served_model import served_model_from_folder
    from .shared_catalogue import make_shared_catalogue
    from .table_recovery import reclaim_forever, reclaim_orphans

    for flag in ("slo_tbt_ms", "slo_ttft_s"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value!r}")
    stop = asyncio.create_task(wait_for_signal())
    await asyncio.sleep(0)
    security = ServerSecurity.from_args(args)  # bad files fail before anything starts
    folders = parse_models(args.model)
    folders.update(catalogue_models(args, folders))
    models = {m: served_model_from_folder(m, f, args.dtype) for m, f in folders.items()}
    guard = AdminGuard(read_admin_token(args.admin_token_file) if args.admin_token_file else None)
    dispatcher = make_dispatcher(args.policy, list(models), [n for n, _ in args.prefill], len(args.decode))
    nodes, node_agents = dict(args.node), dict(args.node_agent)
    if missing := sorted(set(nodes.values()) - set(node_agents)):
        raise ValueError(f"--node names nodes without a --node-agent: {', '.join(missing)}")
    backend = FleetBackend(dict(args.prefill), dict(args.decode), args.kvtransfer, dispatcher,
                           nodes=nodes, node_agents=node_agents)
    if args.table_backend == "redis":  # shared by proxies: a dead one's rows are reclaimed by a survivor
        table = make_request_table("redis", url=args.redis_url, name=args.table, capacity=args.table_slots)
        reclaimer = asyncio.create_task(reclaim_forever(table, backend.agents, MAX_ATTEMPTS))
    else:
        try:
            table = make_request_table("shm", name=args.table, capacity=args.table_slots, create=True)
        except FileExistsError:  # a proxy before us died without removing it: adopt it, reclaim its rows
            table = make_request_table("shm", attach=True, name=args.table)
        reclaimer = None
    await reclaim_orphans(table, backend.agents, MAX_ATTEMPTS)
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, sorted(models))
    slo = asyncio.create_task(_learn_slo(args, backend, metrics))
    fence = asyncio.create_task(_wait_fenced(table))
    servicer = InferenceServicer(backend, models, table, metrics, registry)
    shared = follower = None
    try:
        shared = make_shared_catalogue(args.table_backend, args.redis_url, args.table)
        admin = AdminServicer(backend, models, folders, guard, metrics, args.dtype, shared)
        await admin.adopt()  # a restarted proxy: the fleet's catalogue, run-time changes included
        if shared is not None:  # other proxies' catalogue changes
            follower = asyncio.create_task(admin.follow())
        server = await start_grpc_server(args.listen, [(inference_pb2_grpc.add_InferenceServicer_to_server,
                                                        servicer),
                                                       (admin_pb2_grpc.add_AdminServicer_to_server, admin)],
                                         ["tokenpool.v1.Inference", "tokenpool.v1.Admin"],
                                         trace_roots=True, metrics_port=args.metrics_port, registry=registry,
                                         security=security)
        announce_ready(args.ready_file, "proxy", server.address, table=args.table, models=sorted(models),
                       metrics=server.metrics_address)
        await asyncio.wait([stop, fence], return_when=asyncio.FIRST_COMPLETED)
        if fence.done():
            log.error("request table %r fenced this proxy: its heartbeat key lapsed (Redis restarted empty, "
                      "or this proxy was cut off from Redis for longer than the heartbeat TTL), so it can "
                      "never write to the table again. Health is NOT_SERVING, new requests get UNAVAILABLE "
                      "(clients retry another proxy); exiting with status %d within %g s for the "
                      "supervisor to start a fresh proxy", args.table, EXIT_FENCED,
                      FENCED_NOTICE_S + STOP_GRACE_S)
            await stop_serving(server, servicer, FENCED_NOTICE_S, f"this proxy was fenced by request table "
                               f"{args.table!r} (its heartbeat lapsed)")
            return EXIT_FENCED
        print("tokenpool: proxy shutting down", file=sys.stderr, flush=True)
        await stop_serving(server, servicer, 0.0, "the proxy is shutting down")
        return None
    finally:
        stop.cancel()
        fence.cancel()
        slo.cancel()
        for task in (reclaimer, follower):
            if task is not None:
                task.cancel()
        if shared is not None:
            shared.close()
        await backend.close()
        servicer.close()
        table.close()
        if args.table_backend == "shm":  # a Redis table outlives any one proxy
            table.unlink()


async def _wait_fenced(table) -> None:
    """Return once the table has fenced this proxy; never on a table without fencing (shm)."""
    while not table.fenced:
        await asyncio.sleep(FENCE_POLL_S)


async def _learn_slo(args: argparse.Namespace, backend, metrics) -> None:
    """The SLO attainment is scored against: the flags, else the decode instances' TBT target
    (asked until one answers) and TTFT_PER_TBT times it."""
    from tokenpool.bench.metrics import SLO

    tbt_s = args.slo_tbt_ms / 1e3 if args.slo_tbt_ms else None
    while tbt_s is None:
        decode = [s for s in await backend.statuses() if s.role == "decode"]  # answered
        if decode:  # the baselines set no target: the paper's 100 ms
            tbt_s = next((s.tbt_target_s for s in decode if s.tbt_target_s), DEFAULT_TBT_S)
        else:
            await asyncio.sleep(SLO_POLL_S)
    metrics.slo = SLO(ttft_s=args.slo_ttft_s or TTFT_PER_TBT * tbt_s, tbt_s=tbt_s)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tokenpool.cli.service_process import run_service

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s proxy %(levelname)s: %(message)s")
    return run_service(serve(args), "proxy")


if __name__ == "__main__":
    sys.exit(main())
