"""Who may talk to a service: TLS (optionally mutual) and a bearer token, for the public API.

    --tls-cert FILE --tls-key FILE    serve TLS with this certificate chain and key (PEM)
    --tls-client-ca FILE              mutual TLS: clients must present a certificate this CA signed
    --auth-token-file FILE            every call but health checks needs "authorization: Bearer <token>"

Health checks stay reachable without a token (load balancers and `tokenpool status` probe them);
they still go over TLS when TLS is on. Tokens are compared in constant time. A file that
cannot be read, an empty token, or a certificate without its key is refused at start, by name.
"""

from __future__ import annotations

import hmac
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
ADMIN_PREFIX = "/tokenpool.v1.Admin/"  # checks its own token (cli/admin_token.py)
MAX_TOKEN_BYTES = 4096


def add_security_args(p) -> None:
    p.add_argument("--tls-cert", type=Path, default=None, metavar="FILE",
                   help="serve TLS: certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="serve TLS: private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, default=None, metavar="FILE",
                   help="mutual TLS: accept only clients with a certificate this CA (PEM) signed")
    p.add_argument("--auth-token-file", type=Path, default=None, metavar="FILE",
                   help="require 'authorization: Bearer <the file's first line>' on every call but health")


@dataclass(frozen=True)
class ServerSecurity:
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    client_ca: bytes | None = None
    token: str | None = None

    @classmethod
    def from_args(cls, args) -> ServerSecurity:
        """ValueError naming the flag: half a key pair, an unreadable file, an empty token."""
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if args.tls_client_ca is not None and args.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        token = None
        if args.auth_token_file is not None:
            token = first_line(args.auth_token_file, "--auth-token-file")
            if not token or len(token) > MAX_TOKEN_BYTES:
                raise ValueError(f"--auth-token-file {args.auth_token_file}: the first line must hold a "
                                 f"token of 1 to {MAX_TOKEN_BYTES} characters")
        return cls(_read(args.tls_cert, "--tls-cert") if args.tls_cert else None,
                   _read(args.tls_key, "--tls-key") if args.tls_key else None,
                   _read(args.tls_client_ca, "--tls-client-ca") if args.tls_client_ca else None, token)

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.cert_chain is None:
            return None
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)],
                                           root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)

    def interceptors(self) -> list:
        return [BearerTokenGuard(self.token)] if self.token else []


def read_private_token(path: Path, label: str) -> str:
    """A token file's token, for a file only its owner may read; ValueError naming `label`:
    unreadable, readable by group or others, or no token of 1 to MAX_TOKEN_BYTES characters."""
    check_private(path, label, "the token file")
    token = first_line(Path(path), label)
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"{label}{path}: the first line must hold a token of 1 to {MAX_TOKEN_BYTES} "
                         "characters")
    return token


def check_private(path: Path, label: str, what: str) -> None:
    """ValueError naming `label` when the file cannot be read or its group or others may read it."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise ValueError(f"{label}{path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{label}{path}: {what} must be readable by its owner only "
                         f"(mode {stat.S_IMODE(mode):o}; chmod 600 it)")


def first_line(path: Path, flag: str) -> str:
    """A token file's token: its first line, stripped ("" for an empty file)."""
    lines = _read(path, flag).decode("utf-8", "replace").splitlines()
    return lines[0].strip() if lines else ""


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None


class BearerTokenGuard(grpc.aio.ServerInterceptor):
    """Calls without the token end UNAUTHENTICATED before any servicer code runs; health is exempt,
    and so is the admin service, which demands its own token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith((HEALTH_PREFIX, ADMIN_PREFIX)):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        return _refusing(handler)


async def _refuse(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


async def _refuse_stream(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
    yield  # pragma: no cover - abort raises


def _refusing(handler):
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse_stream, deserialize, serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse, deserialize, serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse_stream, deserialize, serialize)
    return grpc.unary_unary_rpc_method_handler(_refuse, deserialize, serialize)



# -- the client side (tokenpool generate) ---------------------------------------------------------

def add_client_security_args(p) -> None:
    p.add_argument("--tls-ca", type=Path, default=None, metavar="FILE",
                   help="connect with TLS, trusting this CA (PEM)")
    p.add_argument("--tls-client-cert", type=Path, default=None, metavar="FILE",
                   help="mutual TLS: this client's certificate (PEM)")
    p.add_argument("--tls-client-key", type=Path, default=None, metavar="FILE", help="and its key (PEM)")
    p.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help="send 'authorization: Bearer <the file's first line>'")


def client_channel(address: str, args) -> grpc.Channel:
    """A channel as the flags ask: plaintext, TLS, or mutual TLS; ValueError naming a bad flag."""
    if (args.tls_client_cert is None) != (args.tls_client_key is None):
        raise ValueError("--tls-client-cert and --tls-client-key go together")
    if args.tls_ca is None:
        if args.tls_client_cert is not None:
            raise ValueError("--tls-client-cert needs --tls-ca (mutual TLS is TLS first)")
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca, "--tls-ca"),
        private_key=_read(args.tls_client_key, "--tls-client-key") if args.tls_client_key else None,
        certificate_chain=_read(args.tls_client_cert, "--tls-client-cert") if args.tls_client_cert else None)
    return grpc.secure_channel(address, credentials)


def client_metadata(args) -> list[tuple[str, str]]:
    if args.token_file is None:
        return []
    token = first_line(args.token_file, "--token-file")
    if not token:
        raise ValueError(f"--token-file {args.token_file}: the first line must hold the token")
    return [("authorization", f"Bearer {token}")]
