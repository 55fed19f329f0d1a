"""`tokenpool status`: the request tables on this node and the requests in flight."""

from __future__ import annotations

import argparse
import time


def add_parser(commands) -> None:
    p = commands.add_parser("status", help="request tables on this node and the requests in them")
    p.add_argument("--requests", action="store_true", help="list every request in flight")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from tokenpool.proxy.shm_request_table import ShmRequestTable, default_root

    tables = sorted(default_root().glob("*.reqtable"))
    if not tables:
        print(f"no request tables under {default_root()}: is `tokenpool serve` running?")
    for path in tables:
        with ShmRequestTable.attach(path.stem) as table:
            usage = table.usage()
            print(f"{path.stem}: {usage.used}/{usage.capacity} slots in use")
            if args.requests:
                _print_records(table.records())


def _print_records(records) -> None:
    now = time.time_ns()
    for slot, r in records:
        age = (now - r.created_ns) / 1e9
        print(f"  slot {slot:5} {r.request_id:34} {r.model:24} {r.state.value:12} "
              f"prompt {r.num_prompt_tokens:5} out {r.num_output_tokens:5} age {age:7.2f} s")
