"""`tokenpool status`: the stacks and request tables on this node — instances, resident models,
queues, the hand-off pool, and the requests in flight. A stack of this node whose table is in
Redis shows that table; `--redis-url URL [--table NAME]` shows the tables in a Redis server from
any host (in Kubernetes: the one every proxy and instance reports into)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STATUS_TIMEOUT_S = 5.0
MAX_LISTED_MODELS = 12  # more: counts by tier


def add_parser(commands) -> None:
    p = commands.add_parser("status", help="stacks and request tables on this node, and the requests in them")
    p.add_argument("--requests", action="store_true", help="list every request in flight")
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help="also the request tables in this Redis server (the proxies' --redis-url)")
    p.add_argument("--table", default=None, metavar="NAME", help="with --redis-url: only this table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from tokenpool.engine.private_shm import shm_root
    from tokenpool.proxy.shm_request_table import default_root

    stacks = sorted(shm_root().glob("*.stack.json"))
    redis_tables = []  # (url, name) of the stacks' Redis tables
    for path in stacks:
        redis_tables += _print_stack(path)
    tables = sorted(default_root().glob("*.reqtable"))
    if not tables and not stacks and not args.redis_url:
        print(f"no stacks or request tables under {shm_root()}: "
              "is `tokenpool up` or `tokenpool serve` running?")
    for path in tables:
        _print_table("shm", {"name": path.stem}, path.stem, args.requests)
    if args.redis_url:
        redis_tables += [(args.redis_url, name) for name in _redis_table_names(args)]
    for url, name in dict.fromkeys(redis_tables):
        _print_table("redis", {"url": url, "name": name}, f"{name} (Redis {_safe_url(url)})", args.requests)


def _print_stack(path: Path) -> list[tuple[str, str]]:
    """-> (url, table name) of the stack's request table if it is in Redis."""
    from tokenpool.proxy.table_recovery import process_alive

    from .internal_tls import ENVS as TLS_ENVS
    from .internal_tls import InternalTLS
    from .internal_token import read_token

    info = json.loads(path.read_text())
    if not process_alive(info["pid"]):  # its launcher was killed (SIGKILL: no clean stop)
        path.unlink(missing_ok=True)
        print(f"{info['name']}: launcher pid {info['pid']} is gone; removed its stale entry")
        return []
    print(f"{info['name']} (launcher pid {info['pid']}; logs in {info['logs']})")
    token_file = info.get("internal_token_file")
    metadata = (("authorization", f"Bearer {read_token(Path(token_file))}"),) if token_file else ()
    tls_env = info.get("internal_tls")  # the TLS variables the stack's services were given
    tls = InternalTLS.from_files(*(Path(tls_env[name]) for name in TLS_ENVS)) if tls_env else None
    for service in info["services"]:
        print(f"  {service['name']:14} {service['address']:22} {_describe(service, metadata, tls)}")
    return [(info["redis_url"], info["table"])] if info.get("table_backend") == "redis" else []


def _describe(service: dict, metadata: tuple = (), tls=None) -> str:
    import grpc
    from tokenpool.protos.internal.v1 import instances_pb2 as ipb
    from tokenpool.protos.internal.v1 import instances_pb2_grpc as rpc

    from .internal_tls import sync_channel

    name = service["name"]
    stub_class = {"prefill": rpc.PrefillStub, "decode": rpc.DecodeStub, "kvtransfer": rpc.KVTransferStub}
    kind = name.split("-")[0]
    if kind == "gateway":
        return f"OpenAI-compatible HTTP API at http://{service['address']}/v1"
    if kind not in stub_class:
        return "front door (tokenpool.v1.Inference)"
    try:
        with sync_channel(service["address"], tls) as channel:
            stub = stub_class[kind](channel)
            if kind == "kvtransfer":
                s = stub.Stats(ipb.StatsRequest(), timeout=STATUS_TIMEOUT_S, metadata=metadata)
                return (f"hand-off pool {s.used_bytes / 2**20:.1f}/{s.capacity_bytes / 2**20:.0f} MiB, "
                        f"{s.handles} handles")
            s = stub.Status(ipb.StatusRequest(), timeout=STATUS_TIMEOUT_S, metadata=metadata)
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name})"
    per_model = ", ".join(f"{m} {n}" for m, n in sorted(s.requests_by_model.items())) or "none"
    lines = [f"{s.policy}; active {s.active_model or '-'}; queued {s.queued}, running {s.running}; "
             f"requests: {per_model}; KV blocks {s.kv_blocks_used}, host KV "
             f"{s.host_kv_used_bytes / 2**20:.1f} MiB; {s.switches} switches"]
    if s.groups:
        lines.append(f"prefill groups: {', '.join(s.groups)}")
    if s.tbt_target_s:
        quotas = ", ".join(f"{m} {q * 1e3:.0f} ms" for m, q in s.quotas_s.items()) or "-"
        lines.append(f"TBT target {s.tbt_target_s * 1e3:.1f} ms, alpha {s.alpha:.2f}, quotas: {quotas}; "
                     f"switch time c {s.round_switch_s * 1e3:.1f} ms "
                     f"(KV swap-ins x{s.kv_swap_correction:.2f} the start-up rate's)")
    lines.append(_models_line(s))
    if s.loads or s.cold_loads:
        loads = ", ".join(f"{x.model} {x.loaded_bytes / 2**20:.1f}/{x.total_bytes / 2**20:.1f} MiB"
                          + (" (waiting for host-cache room)" if x.waiting_for_room else "")
                          for x in s.loads) or "none now"
        lines.append(f"disk loads: {s.cold_loads} done; loading: {loads}")
    return ("\n" + " " * 40).join(lines)  # under the description column


def _models_line(s) -> str:
    """The instance's models; a long catalogue as counts by tier, not 200 names."""
    if len(s.models) <= MAX_LISTED_MODELS:
        return f"models: {', '.join(s.models)}"
    resident = 1 if s.active_model else 0
    host = len(s.host_cached) - (s.active_model in s.host_cached)
    return (f"models: {len(s.models)} ({resident} resident, {host} in the host cache, "
            f"{len(s.models) - resident - host} on disk)")


def _redis_table_names(args: argparse.Namespace) -> list[str]:
    from tokenpool.proxy.redis_request_table import table_names

    if args.table:
        return [args.table]
    names = table_names(args.redis_url)
    if not names:
        print(f"no request tables in Redis at {_safe_url(args.redis_url)}")
    return names


def _print_table(backend: str, options: dict, title: str, requests: bool) -> None:
    """Attached as a reader (no row is owned, nothing written); a table gone or unreachable is said so."""
    from tokenpool.proxy.request_table import make_request_table

    try:
        table = make_request_table(backend, attach=True, **options)
    except FileNotFoundError:
        print(f"{title}: no such request table (its proxy has not made it, or has removed it)")
        return
    except Exception as exc:  # noqa: BLE001 -- e.g. Redis unreachable: say so, show the rest
        print(f"{title}: unreachable ({exc})")
        return
    with table:
        usage = table.usage()
        print(f"{title}: {usage.used}/{usage.capacity} slots in use")
        if requests:
            _print_records(table.records())


def _safe_url(url: str) -> str:
    """The URL without a password (redis://:secret@host -> redis://***@host)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at and creds else url


def _print_records(records) -> None:
    now = time.time_ns()
    for slot, r in records:
        age = (now - r.created_ns) / 1e9
        where = "/".join(i for i in (r.prefill_instance, r.decode_instance) if i) or "-"
        print(f"  slot {slot:5} {r.request_id:34} {r.model:24} {r.state.value:12} {where:20} "
              f"prompt {r.num_prompt_tokens:5} out {r.num_output_tokens:5} age {age:7.2f} s")
