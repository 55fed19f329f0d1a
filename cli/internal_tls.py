"""Mutual TLS between services: every internal server presents a certificate and takes only callers
that present one the same CA signed; every internal client checks the server's certificate against
that CA and presents its own.

    TOKENPOOL_INTERNAL_TLS_CERT=FILE   this service's certificate chain (PEM); its names (SANs) must
                                       cover the addresses the others dial it by
    TOKENPOOL_INTERNAL_TLS_KEY=FILE    its private key (PEM), readable by its owner only
    TOKENPOOL_INTERNAL_TLS_CA=FILE     the CA certificate (PEM) that signed every service's certificate

All three or none (tokenpool up --internal-tls-cert/-key/-ca sets them for every service it starts).
With them, prefill, decode and kvtransfer serve TLS only and refuse a caller without such a
certificate, health checks included; the proxy, the instances and the agents dial each other over
it; the internal token, when also set, is checked on top. The cross-node KV data plane (NIXL over
UCX) is not gRPC and is not covered: keep it on a private network.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from .server_security import ServerSecurity, check_private

CERT_ENV = "TOKENPOOL_INTERNAL_TLS_CERT"
KEY_ENV = "TOKENPOOL_INTERNAL_TLS_KEY"
CA_ENV = "TOKENPOOL_INTERNAL_TLS_CA"
ENVS = (CERT_ENV, KEY_ENV, CA_ENV)


@dataclass(frozen=True)
class InternalTLS:
    cert_chain: bytes
    private_key: bytes
    ca: bytes

    @classmethod
    def from_files(cls, cert: Path, key: Path, ca: Path, labels: tuple[str, str, str] = ENVS) -> InternalTLS:
        """ValueError naming the variable (or flag) in labels: an unreadable file, a key others may
        read, or a file that holds no PEM block of the kind it should."""
        check_private(key, f"{labels[1]}=", "the private key")
        return cls(_pem(cert, labels[0], "certificate"), _pem(key, labels[1], "private key"),
                   _pem(ca, labels[2], "certificate"))

    def server_security(self, token: str | None) -> ServerSecurity:
        """Serve TLS with this certificate; callers must present one the CA signed."""
        return ServerSecurity(self.cert_chain, self.private_key, self.ca, token)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.private_key,
                                            certificate_chain=self.cert_chain)


@functools.cache
def internal_tls() -> InternalTLS | None:
    """The certificate, key and CA the environment names (read once), or None when none is set."""
    paths = {env: os.environ.get(env) for env in ENVS}
    given = [env for env, path in paths.items() if path]
    if not given:
        return None
    if len(given) < len(ENVS):
        missing = [env for env in ENVS if env not in given]
        raise ValueError(f"internal TLS needs all of {', '.join(ENVS)}: {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set")
    return InternalTLS.from_files(*(Path(paths[env]) for env in ENVS))


def sync_channel(address: str, tls: InternalTLS | None = None) -> grpc.Channel:
    """A blocking channel to an internal service: TLS when internal TLS is configured (or given)."""
    tls = tls or internal_tls()
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.channel_credentials())


def aio_channel(address: str, options=None, interceptors=None) -> grpc.aio.Channel:
    """An asyncio channel to an internal service: TLS when internal TLS is configured."""
    tls = internal_tls()
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options,
                                   interceptors=interceptors)


def _pem(path: Path, label: str, kind: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{label}={path}: {exc.strerror or exc}") from None
    marker = b"PRIVATE KEY-----" if kind == "private key" else b"-----BEGIN CERTIFICATE-----"
    if marker not in data:
        raise ValueError(f"{label}={path}: no PEM {kind} in the file")
    return data
