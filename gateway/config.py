"""GatewayConfig: where the gateway listens, which proxy it fronts, and its limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway's settings; validated at construction (ValueError quoting the bad value).

    host, port: where HTTP is served (port 0 picks one).
    proxy: the proxy's public gRPC address, host:port. Its models are the gateway's, read with
      ListModels (catalogue.py): none are configured here.
    max_body_bytes: a request body larger than this gets 413 (read no further).
    max_stop: stop strings per request at most.
    max_n: choices per request at most (each is one Generate call, one table row).
    max_logprobs: top_logprobs at most (OpenAI's limit is 20).
    proxy_ca: trust this CA (PEM) and reach the proxy over TLS; None: plaintext.
    tls_cert, tls_key: serve HTTPS with this certificate chain and key (PEM).
    retry_after_s: the Retry-After a 429 carries (the proxy's hint, in whole seconds).
    catalogue_refresh_s: seconds between background reads of the proxy's models (and KV usage);
      a request for an id not yet seen reads them at once.
    """

    proxy: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_body_bytes: int = 1 << 20
    max_stop: int = 4
    max_n: int = 8
    max_logprobs: int = 20
    proxy_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    retry_after_s: int = 1
    catalogue_refresh_s: float = 2.0

    def __post_init__(self) -> None:
        if ":" not in self.proxy:
            raise ValueError(f"proxy must be host:port, got {self.proxy!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        for name in ("max_body_bytes", "max_stop", "max_n", "max_logprobs", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if not 0.1 <= self.catalogue_refresh_s <= 3600:
            raise ValueError(f"catalogue_refresh_s must be in [0.1, 3600], got {self.catalogue_refresh_s!r}")
