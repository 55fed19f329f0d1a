"""The request table's flags, shared by the proxy (which owns the table), the instances (which report
progress into it) and `tokenpool status` (which reads it): one backend choice, spelt one way."""

from __future__ import annotations

import argparse
from typing import Any

BACKENDS = ("shm", "redis")


def add_table_backend_args(p: argparse.ArgumentParser) -> None:
    """--table-backend and --redis-url (the table's name is each program's own --table)."""
    p.add_argument("--table-backend", choices=BACKENDS, default="shm",
                   help="shm: the node's table in shared memory; redis: one table shared by proxies and "
                        "instances on any host (--redis-url)")
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help="with --table-backend redis: the server, e.g. redis://10.0.0.5:6379/0")


def attach_options(args: argparse.Namespace) -> dict[str, Any]:
    """make_request_table's options to attach the table args.table on args.table_backend; ValueError
    (naming the flag) if redis has no --redis-url."""
    if args.table_backend != "redis":
        return {"name": args.table}
    if not args.redis_url:
        raise ValueError("--table-backend redis needs --redis-url (e.g. redis://HOST:6379/0)")
    return {"name": args.table, "url": args.redis_url}
