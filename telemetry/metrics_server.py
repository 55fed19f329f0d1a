"""A service's Prometheus endpoint: its own registry, served over HTTP at /metrics.

Each service process keeps its metrics in one CollectorRegistry (not the process-global
default, so nothing else leaks in) and serves it on host:port, the host being the one the
service's gRPC server listens on (127.0.0.1 unless told otherwise); port 0 picks one, and
the address actually bound goes into the service's ready file.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server


@dataclass
class MetricsServer:
    address: str  # host:port actually bound
    httpd: object  # wsgiref server (serving on a daemon thread)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve registry at http://host:port/metrics (port 0 picks one); OSError when it cannot bind."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--metrics-port must be 0..65535, got {port}")
    bind = host.strip("[]") or "127.0.0.1"
    httpd, _ = start_http_server(port, addr=bind, registry=registry)
    return MetricsServer(f"{host}:{httpd.server_port}", httpd)
