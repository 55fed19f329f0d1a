"""`tokenpool up`: the whole stack as local processes — kvtransfer agent, prefill and decode
instances, proxy — on 127.0.0.1, until Ctrl-C.

Counts and the model catalogue come from flags or a TOML file (flags win):

    prefill = 1
    decode = 2
    port = 50051
    [models]
    smollm2-135m-instruct = ""          # "" : the model store's copy (imported if missing)
    my-model = "/path/to/hf/folder"

A proxy, gateway, prefill or decode instance that exits is started again on its address
(RESTARTS times in RESTART_WINDOW_S at most: a proxy fenced off a Redis table exits 3 for exactly
this; an instance killed for memory comes back with its flags, and the proxy brings it in step);
a kvtransfer agent's exit, or one restart too many, stops the stack.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import tomllib
from collections import deque
from pathlib import Path

from .serve_command import catalogue

CONFIG_KEYS = ("prefill", "decode", "host", "port", "dtype", "kv_mib", "host_kv_mib", "pool_mib",
               "threads", "device", "engine", "table_slots", "table_backend", "redis_url", "policy", "tbt_ms",
               "qmax_s", "trace_endpoint",
               "nodes",
               "kv_streaming", "tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "internal_token",
               "internal_tls_cert", "internal_tls_key", "internal_tls_ca",
               "gateway", "gateway_port", "catalogue", "host_cache_mib", "host_cache_dir", "slot_mib",
               "load_wait_s",
               "admin_token_file")
WATCH_INTERVAL_S = 0.5
RESTARTS, RESTART_WINDOW_S = 3, 300.0  # per service: more than this many in the window stops the stack


def add_parser(commands) -> None:
    p = commands.add_parser("up", help="start the disaggregated stack (proxy, prefill, decode, kvtransfer)")
    p.add_argument("--config", type=Path, default=None, help="a TOML file (keys: see `tokenpool up --help`)")
    p.add_argument("--model", action="append", default=[], metavar="ID[=FOLDER]",
                   help="a model to serve (repeatable; default: SmolLM2 and the tiny models)")
    p.add_argument("--prefill", type=int, help="prefill instances (default 1)")
    p.add_argument("--decode", type=int, help="decode instances (default 2)")
    p.add_argument("--host", help="where the proxy listens (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="the proxy's port (default 50051; 0 picks one)")
    p.add_argument("--dtype", help="weights: auto, float32, bfloat16")
    p.add_argument("--kv-mib", type=int, help="device KV region per instance, MiB (default 64)")
    p.add_argument("--host-kv-mib", type=int, help="host KV pool per instance, MiB (default 256)")
    p.add_argument("--pool-mib", type=int, help="the node's hand-off pool, MiB (default 256)")
    p.add_argument("--threads", type=int, help="compute threads per instance (default: cores / instances)")
    p.add_argument("--engine", choices=["native", "vllm"],
                   help="model backend of every instance: native (default) or vllm (tokenpool[vllm])")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="where instances keep weights and KV (default cpu)")
    p.add_argument("--table-slots", type=int, help="requests in flight at most (default 1024)")
    p.add_argument("--table-backend", choices=["shm", "redis"],
                   help="the request table, for the proxy and every instance: shm (default: this node's "
                   "shared memory) or redis (--redis-url; `tokenpool status` finds it through the stack)")
    p.add_argument("--redis-url", help="with --table-backend redis: the server, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--policy", help="scheduling: aegaeon (default), static (one model per instance, no "
                   "switching) or request (request-level scaling)")
    p.add_argument("--tbt-ms", type=float, help="decode TBT target (default: 4x the measured single step)")
    p.add_argument("--qmax-s", type=float, help="longest decode time quota, seconds (default 4)")
    p.add_argument("--log-dir", type=Path, default=None, help="one log per service (default: a temp dir)")
    p.add_argument("--trace", dest="trace_endpoint", nargs="?", const="http://127.0.0.1:4317", default=None,
                   metavar="ENDPOINT", help="send every service's traces to this OTLP gRPC endpoint "
                   "(default http://127.0.0.1:4317, e.g. Jaeger all-in-one)")
    p.add_argument("--nodes", type=int, help="1 (default), or 2: two simulated nodes on this machine, each "
                   "with its own kvtransfer agent and pool, prefill on node 0, decode on node 1, KV moved "
                   "by NIXL")
    p.add_argument("--kv-streaming", dest="kv_streaming", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="prefill streams each layer's KV out while later layers compute (default: on)")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="TLS on the public port (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="its private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, default=None, metavar="FILE",
                   help="mutual TLS: clients need a certificate this CA signed")
    p.add_argument("--auth-token-file", type=Path, default=None, metavar="FILE",
                   help="clients need 'authorization: Bearer <the file's first line>' (health exempt)")
    p.add_argument("--internal-token", dest="internal_token", action=argparse.BooleanOptionalAction,
                   default=None, help="services authenticate each other with a random token made for this "
                   "stack (always on when --host is not loopback)")
    p.add_argument("--internal-tls-cert", type=Path, default=None, metavar="FILE",
                   help="mutual TLS between the services: the certificate (PEM) every service presents; its "
                   "names must cover --host")
    p.add_argument("--internal-tls-key", type=Path, default=None, metavar="FILE",
                   help="its private key (PEM, readable by its owner only)")
    p.add_argument("--internal-tls-ca", type=Path, default=None, metavar="FILE",
                   help="the CA (PEM) that signed it: services take only callers with a certificate "
                   "it signed")
    p.add_argument("--gateway", dest="gateway", action=argparse.BooleanOptionalAction, default=None,
                   help="the OpenAI-compatible HTTP API (/v1/chat/completions, ...) in front of the proxy "
                   "(default: on)")
    p.add_argument("--gateway-port", type=int,
                   help="the HTTP gateway's port, on --host (default 8000; 0 picks one)")
    p.add_argument("--catalogue", type=Path, default=None, metavar="DIR",
                   help="serve every model folder under DIR, loaded from disk on demand (with --model: "
                   "those too; alone: only the catalogue)")
    p.add_argument("--host-cache-mib", type=int, default=None,
                   help="the node's host model cache, MiB (default 8192); a catalogue may exceed it. One "
                   "size per cache: one already in use by other processes keeps theirs (a warning says so)")
    p.add_argument("--host-cache-dir", type=Path, default=None, metavar="DIR",
                   help="the host model cache's folder (default /dev/shm/tokenpool-<uid>/models, shared "
                   "by the node's stacks)")
    p.add_argument("--load-wait-s", type=float, default=None, metavar="S",
                   help="how long a catalogue model's disk load waits for host-cache room held by busy "
                   "models before its requests fail RESOURCE_EXHAUSTED (default 120)")
    p.add_argument("--slot-mib", type=int, default=None,
                   help="each instance's arena model slots, MiB (default: the largest model at start; larger "
                   "models cannot be added later)")
    p.add_argument("--admin-token-file", type=Path, default=None, metavar="FILE",
                   help="open the admin API (`tokenpool models add/remove/evict/preload --server`) to this "
                   "token (a 0600 file); without it the catalogue is fixed")
    p.set_defaults(run=run)


def stack_config(args: argparse.Namespace):
    """Flags over the config file over the defaults -> StackConfig (ValueError on bad values)."""
    from tokenpool.compose.launcher import StackConfig

    file = _read_config(args.config) if args.config else {}
    values = {k: file[k] for k in CONFIG_KEYS if k in file}
    values.update({k: getattr(args, k) for k in CONFIG_KEYS if getattr(args, k) is not None})
    values.setdefault("gateway", True)  # on for `tokenpool up`; StackConfig's default (tests) is off
    specs = args.model or [f"{m}={f}" if f else m for m, f in file.get("models", {}).items()]
    for key in ("catalogue", "admin_token_file", "host_cache_dir", "internal_tls_cert", "internal_tls_key",
                "internal_tls_ca"):
        if key in values:  # absolute: every service is given the same path
            values[key] = Path(values[key]).expanduser().resolve()
    # With a catalogue folder, no --model means only the catalogue (not the built-in models).
    models = catalogue(specs) if specs or "catalogue" not in values else {}
    return StackConfig(models=models, **values)


def _read_config(path: Path) -> dict:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--config {path}: {exc}") from None
    unknown = set(data) - set(CONFIG_KEYS) - {"models"}
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {sorted(unknown)}; "
                         f"known: {[*CONFIG_KEYS, 'models']}")
    if not isinstance(data.get("models", {}), dict):
        raise ValueError(f"--config {path}: [models] must be a table of id = \"folder\"")
    return data


def run(args: argparse.Namespace) -> int:
    from tokenpool.compose.launcher import Stack, StackStartError

    config = stack_config(args)
    stack = Stack(config, args.log_dir)
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    served = ", ".join(config.models) + (f" and the catalogue {config.catalogue}" if config.catalogue else "")
    print(f"tokenpool: starting {config.prefill} prefill and {config.decode} decode instances serving "
          f"{served.removeprefix(' and ')}; logs in {stack.log_dir}", flush=True)
    try:
        stack.start()
    except StackStartError as exc:
        print(f"tokenpool: error: {exc}", file=sys.stderr)
        return 1
    print(f"tokenpool: stack up: connect to {stack.address} (tokenpool.v1.Inference; health and "
          f"reflection on); `tokenpool status` shows it; Ctrl-C stops it", flush=True)
    if stack.gateway_url:
        print(f"tokenpool: OpenAI-compatible API at {stack.gateway_url} (chat/completions, completions, "
              "models)", flush=True)
    print("tokenpool: metrics: " + ", ".join(f"{s.name} {s.metrics_url}" for s in stack.services), flush=True)
    if config.trace_endpoint:
        print(f"tokenpool: traces go to {config.trace_endpoint} (OTLP gRPC)", flush=True)
    code = _watch(stack, stopping)
    print("tokenpool: shutting down", file=sys.stderr, flush=True)
    for name, exit_code in stack.stop():
        if exit_code != 0:
            print(f"tokenpool: {name} exited with code {exit_code}", file=sys.stderr)
    return code


def _watch(stack, stopping: list) -> int:
    """Until Ctrl-C (0) or a service dies that cannot be restarted, or too often (1)."""
    from tokenpool.compose.launcher import StackStartError

    restarts: dict[str, deque[float]] = {}
    while not stopping:
        for service in stack.dead():
            print(f"tokenpool: {service.name} exited with code {service.process.returncode}; "
                  f"see {service.log}", file=sys.stderr, flush=True)
            recent = restarts.setdefault(service.name, deque())
            while recent and recent[0] < time.monotonic() - RESTART_WINDOW_S:
                recent.popleft()
            if not service.restartable or len(recent) >= RESTARTS:
                if service.restartable:
                    print(f"tokenpool: {service.name} already restarted {len(recent)} times in "
                          f"{RESTART_WINDOW_S:.0f} s; stopping", file=sys.stderr)
                return 1
            recent.append(time.monotonic())
            try:
                stack.restart(service, progress=lambda line: print(line, flush=True))
            except StackStartError as exc:
                print(f"tokenpool: error: restarting {service.name}: {exc}", file=sys.stderr)
                return 1
        time.sleep(WATCH_INTERVAL_S)
    return 0
