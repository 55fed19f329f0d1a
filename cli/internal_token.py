"""The token internal services share: every call between them carries it, every internal server
checks it.

    TOKENPOOL_INTERNAL_TOKEN_FILE=FILE   the token is the file's first line; the file must be
                                         readable by its owner only (tokenpool up --internal-token
                                         writes one in the stack's private folder)
    servers   prefill, decode and kvtransfer answer UNAUTHENTICATED to a call without
              "authorization: Bearer <token>" (health checks exempt)
    clients   every internal channel (telemetry.grpc_tracing.aio_channel / intercept: proxy ->
              instances and agents, instances -> agent, agent -> agent) attaches it

Internal services bind 127.0.0.1 by default; one told to listen anywhere else refuses to start
without a token or mutual TLS (cli/internal_tls.py), so nothing reaches them from off the machine
unauthenticated.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from pathlib import Path

from .internal_tls import ENVS as TLS_ENVS
from .internal_tls import internal_tls
from .server_security import ServerSecurity, read_private_token

ENV = "TOKENPOOL_INTERNAL_TOKEN_FILE"


@functools.cache
def internal_token() -> str | None:
    """The token named by $TOKENPOOL_INTERNAL_TOKEN_FILE (read once), or None when it is unset.
    ValueError naming the file: unreadable, empty, or readable by anyone but its owner."""
    path = os.environ.get(ENV)
    return read_token(Path(path)) if path else None


def read_token(path: Path) -> str:
    return read_private_token(path, f"{ENV}=")


def server_security() -> ServerSecurity:
    """What an internal server checks: the internal token and mutual TLS, each if configured."""
    tls = internal_tls()
    return tls.server_security(internal_token()) if tls else ServerSecurity(token=internal_token())


def check_listen(address: str) -> None:
    """ValueError when an internal service would listen beyond loopback without a token."""
    host = address.rpartition(":")[0].strip("[]")
    if internal_token() is None and internal_tls() is None and not is_loopback(host):
        raise ValueError(f"--listen {address}: an internal service listening beyond 127.0.0.1 needs the "
                         f"internal token (set {ENV} to a 0600 file holding it) or mutual TLS "
                         f"({', '.join(TLS_ENVS)})")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def metadata() -> tuple[tuple[str, str], ...]:
    """The metadata an internal call carries (empty without a token)."""
    token = internal_token()
    return (("authorization", f"Bearer {token}"),) if token else ()
