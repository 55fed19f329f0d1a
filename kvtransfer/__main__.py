"""`python -m tokenpool.kvtransfer`: the node's KV transfer agent as a service process.

    python -m tokenpool.kvtransfer --listen 127.0.0.1:0 --pool-mib 256 --slab-mib 4 \\
        --name kvtransfer-0 [--advertise HOST[:PORT]] [--ready-file PATH] [--handle-ttl-s 300] \\
        [--lease-s 10] [--nixl [--allow-peer kvtransfer-1 ...] [--stall-s 30]]

Creates the host KV pool file, serves tokenpool.internal.v1.KVTransfer (with health and
reflection), announces its address, and on SIGTERM or SIGINT stops serving and unlinks the file.
With --nixl the pool is registered with a NIXL (UCX) agent named --name and other nodes' agents
may Connect and exchange KV with it (only those named by --allow-peer, when given).
Exit codes: 0 after a signal, 1 when the agent cannot start, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from tokenpool.cli.service_process import add_metrics_arg

from .lease import DEFAULT_LEASE_S, MIN_LEASE_S, RENEW_INTERVAL_S

STOP_GRACE_S = 1.0  # KVTransfer calls are short; in-flight ones get this long to finish


def _positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: `kind` of the text, refused unless positive."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value
    return parse


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 0 picks one), got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenpool.kvtransfer",
                                description="the node's KV transfer agent (tokenpool.internal.v1.KVTransfer)")
    p.add_argument("--listen", type=_address, default="127.0.0.1:0", help="HOST:PORT; port 0 picks one")
    p.add_argument("--pool-mib", type=_positive(int), default=256, help="host KV pool size, MiB")
    p.add_argument("--slab-mib", type=_positive(int), default=4, help="slab size of the pool, MiB")
    p.add_argument("--name", default="kvtransfer-0", help="service name in the ready announcement")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write {name, address, pid, pool} here as JSON once serving (else print a line)")
    p.add_argument("--handle-ttl-s", type=_positive(float), default=300.0,
                   help="seconds after which an unreleased handle's blocks are reclaimed")
    p.add_argument("--lease-s", type=_positive(float), default=DEFAULT_LEASE_S,
                   help="a handed-off handle whose receiver stops renewing it is freed after this long "
                        f"(at least {MIN_LEASE_S:g} s)")
    p.add_argument("--advertise", default=None, metavar="HOST[:PORT]",
                   help="the address this agent stamps on its handles and gives its peers (a DNS name "
                        "other nodes resolve; default: --listen's, a wildcard host replaced by this "
                        "host's name, so that each node's agent is named apart)")
    p.add_argument("--nixl", action="store_true",
                   help="serve cross-node transfers: register the pool with a NIXL (UCX) agent named --name")
    p.add_argument("--allow-peer", action="append", default=None, metavar="NAME",
                   help="with --nixl: an agent that may connect (repeatable; default: any, up to "
                        "--max-peers)")
    p.add_argument("--max-peers", type=_positive(int), default=16, help="with --nixl: peers at most")
    p.add_argument("--stall-s", type=_positive(float), default=30.0,
                   help="with --nixl: a cross-node transfer with no progress this long is failed and freed")
    add_metrics_arg(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lease_s < MIN_LEASE_S:
        parser.error(f"--lease-s {args.lease_s:g}: at least {MIN_LEASE_S:g} s (receivers renew every "
                     f"{RENEW_INTERVAL_S:g} s)")
    if args.slab_mib > args.pool_mib:
        parser.error(f"--slab-mib {args.slab_mib} exceeds --pool-mib {args.pool_mib}: "
                     f"the pool holds whole slabs")
    return args


async def serve(args: argparse.Namespace) -> None:
    from prometheus_client import CollectorRegistry
    from tokenpool.cli import internal_token
    from tokenpool.cli.service_process import announce_ready, start_grpc_server, wait_for_signal
    from tokenpool.protos.internal.v1 import instances_pb2_grpc
    from tokenpool.telemetry.agent_metrics import AgentMetrics

    from .agent import SERVICE_NAME, KVTransferAgent

    # Handlers go in before the pool file exists: a SIGTERM during start-up then ends in the
    # clean shutdown below instead of killing the process and leaving the file in /dev/shm.
    internal_token.check_listen(args.listen)
    stop = asyncio.create_task(wait_for_signal())
    await asyncio.sleep(0)
    registry = CollectorRegistry()
    allowed = frozenset(args.allow_peer) if args.allow_peer else None
    agent = KVTransferAgent(args.pool_mib << 20, slab_bytes=args.slab_mib << 20,
                            handle_ttl_s=args.handle_ttl_s, lease_s=args.lease_s,
                            metrics=AgentMetrics(registry),
                            name=args.name,
                            nixl=args.nixl, allowed_peers=allowed, max_peers=args.max_peers,
                            stall_s=args.stall_s, transfer_timeout_s=min(10.0, args.stall_s / 2))
    try:
        servicers = [(instances_pb2_grpc.add_KVTransferServicer_to_server, agent)]
        server = await start_grpc_server(args.listen, servicers, [SERVICE_NAME],
                                         metrics_port=args.metrics_port, registry=registry,
                                         security=internal_token.server_security())
        agent.address = advertised_address(args.advertise, server.address)
        agent.start()
        announce_ready(args.ready_file, args.name, server.address, pool=str(agent.pool.path),
                       metrics=server.metrics_address, nixl=args.nixl)
        await stop
        print(f"tokenpool: {args.name} shutting down", file=sys.stderr, flush=True)
        await server.grpc.stop(STOP_GRACE_S)
    finally:
        agent.close()


def advertised_address(advertise: str | None, bound: str) -> str:
    """What the agent calls itself: --advertise (its port the bound one unless given), else the
    bound HOST:PORT with a wildcard host (0.0.0.0, ::) replaced by this host's name: two nodes'
    agents both bound to 0.0.0.0:7000 must not name their handles alike."""
    port = bound.rpartition(":")[2]
    if advertise:
        host, sep, given = advertise.rpartition(":")
        return advertise if sep and given.isdigit() and not host.endswith(":") else f"{advertise}:{port}"
    if bound.rpartition(":")[0].strip("[]") in ("0.0.0.0", "::", ""):
        return f"{socket.gethostname()}:{port}"
    return bound


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tokenpool.cli.service_process import run_service

    return run_service(serve(args), args.name)


if __name__ == "__main__":
    sys.exit(main())
