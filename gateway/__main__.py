"""`python -m tokenpool.gateway`: the OpenAI-compatible HTTP gateway in front of a proxy.

    python -m tokenpool.gateway --listen 127.0.0.1:8000 --proxy 127.0.0.1:50051

It serves the proxy's models as its catalogue changes, tokenized by the proxy: no model files
are read here.

Serves HTTP with uvicorn (uvloop, httptools) until SIGINT/SIGTERM; with --ready-file it
announces its address there as the other services do (compose/launcher.py waits on it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from pathlib import Path

import uvicorn

from .config import DEFAULT_PORT, GatewayConfig

STOP_GRACE_S = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenpool.gateway", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", help="host:port (port 0 picks one)")
    p.add_argument("--proxy", required=True, metavar="HOST:PORT", help="the proxy's public gRPC address")
    p.add_argument("--catalogue-refresh-s", type=float, default=2.0,
                   help="seconds between reads of the proxy's models (an unknown id reads them at once)")
    p.add_argument("--proxy-ca", type=Path, default=None, metavar="FILE",
                   help="reach the proxy over TLS, trusting this CA (PEM)")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="serve HTTPS (PEM chain)")
    p.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="its private key (PEM)")
    p.add_argument("--auth-token-file", type=Path, default=None, metavar="FILE",
                   help="clients need 'Authorization: Bearer <the file's first line>' (/health and "
                        "/metrics exempt); the header also goes on to the proxy")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    p.add_argument("--max-n", type=int, default=8, help="choices per request at most")
    p.add_argument("--max-stop", type=int, default=4, help="stop strings per request at most")
    p.add_argument("--ready-file", type=Path, default=None)
    return p


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {args.listen!r}")
    return GatewayConfig(proxy=args.proxy, host=host, port=int(port), max_body_bytes=args.max_body_bytes,
                         max_stop=args.max_stop, max_n=args.max_n, proxy_ca=args.proxy_ca,
                         tls_cert=args.tls_cert, tls_key=args.tls_key,
                         catalogue_refresh_s=args.catalogue_refresh_s)


async def serve(args: argparse.Namespace) -> None:
    from tokenpool.cli.server_security import first_line
    from tokenpool.cli.service_process import announce_ready, wait_for_signal

    from .app import Gateway
    from .proxy_client import ProxyClient

    config = config_from_args(args)
    token = first_line(args.auth_token_file, "--auth-token-file") if args.auth_token_file else None
    if args.auth_token_file and not token:
        raise ValueError(f"--auth-token-file {args.auth_token_file}: the first line must hold the token")
    gateway = Gateway(config, ProxyClient(config), token)
    sock = _bind(config.host, config.port)  # bound here, so port 0's choice is known before serving
    server = _Server(uvicorn.Config(
        gateway.app(), loop="none", http="httptools", log_level="warning", access_log=False,
        ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key, timeout_graceful_shutdown=STOP_GRACE_S))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if serving.done():
        serving.result()  # raises what stopped it
        raise RuntimeError("the HTTP server stopped while starting")
    address = f"{config.host}:{sock.getsockname()[1]}"
    announce_ready(args.ready_file, "gateway", address, metrics=address,
                   url=f"{'https' if config.tls_cert else 'http'}://{address}/v1")
    stop = asyncio.create_task(wait_for_signal())
    await asyncio.wait([stop, serving], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await serving


class _Server(uvicorn.Server):
    """uvicorn's Server, leaving SIGINT/SIGTERM to wait_for_signal (the services' one way to stop)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    from tokenpool.cli.service_process import run_service

    return run_service(serve(build_parser().parse_args(argv)), "gateway")


if __name__ == "__main__":
    sys.exit(main())
