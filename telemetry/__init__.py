"""Observability: distributed traces (OpenTelemetry, exported over OTLP) and Prometheus metrics."""
