"""`tokenpool models add|remove|evict|preload|list --server ADDR`: a running stack's catalogue,
through the proxy's admin service (tokenpool.v1.Admin, protos/v1/admin.proto).

    tokenpool models add ID FOLDER --server 127.0.0.1:50051 --admin-token-file FILE
    tokenpool models remove ID ...      refused while requests for ID are in flight
    tokenpool models evict ID ...       drop it from the node's host cache (it stays servable)
    tokenpool models preload ID ...     start reading it from disk into the host cache
    tokenpool models list --server ...  every model with its tier (without --server: the local store)

Each prints one line; a refusal prints `tokenpool: error: <STATUS>: <why>` and exits 2.
The token comes from --admin-token-file or $TOKENPOOL_ADMIN_TOKEN_FILE.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ADMIN_TIMEOUT_S = 300.0  # adding a model of a new shape profiles it on every instance


def add_admin_args(p: argparse.ArgumentParser, server_required: bool = True) -> None:
    from .server_security import add_client_security_args

    p.add_argument("--server", required=server_required, default=None, metavar="HOST:PORT",
                   help="the stack's proxy")
    p.add_argument("--admin-token-file", type=Path, default=None, metavar="FILE",
                   help="the admin token (default: $TOKENPOOL_ADMIN_TOKEN_FILE)")
    add_client_security_args(p)  # TLS to the proxy; --token-file is not used by admin calls


def add_parsers(models) -> None:
    """The remote subcommands, on `tokenpool models`' subparsers (list is shared with the store's)."""
    add = models.add_parser("add", help="serve a model folder under a new id on a running stack")
    add.add_argument("id")
    add.add_argument("folder", type=Path, help="the model's folder (as the instances see it)")
    add_admin_args(add)
    add.set_defaults(run=run_add)
    for name, what in (("remove", "stop serving a model (refused while it has requests in flight)"),
                       ("evict", "drop a model from the node's host cache (it stays servable)"),
                       ("preload", "start reading a model from disk into the host cache")):
        p = models.add_parser(name, help=what)
        p.add_argument("id")
        add_admin_args(p)
        p.set_defaults(run=run_on_model, action=name)


def run_add(args: argparse.Namespace) -> None:
    from tokenpool.protos.v1 import admin_pb2 as apb

    folder = args.folder.expanduser().resolve()  # the proxy takes absolute folders only
    print(_call(args, "AddModel", apb.AddModelRequest(id=args.id, folder=str(folder))).message)


def run_on_model(args: argparse.Namespace) -> None:
    from tokenpool.protos.v1 import admin_pb2 as apb

    method = {"remove": "RemoveModel", "evict": "EvictModel", "preload": "PreloadModel"}[args.action]
    print(_call(args, method, apb.ModelRef(id=args.id)).message)


def run_list(args: argparse.Namespace) -> None:
    from tokenpool.protos.v1 import admin_pb2 as apb

    reply = _call(args, "ListCatalogue", apb.ListCatalogueRequest())
    tiers = {t: sum(m.tier == t for m in reply.models) for t in ("resident", "host", "disk")}
    print(f"{len(reply.models)} models: " + ", ".join(f"{n} {t}" for t, n in tiers.items()))
    for m in reply.models:
        loading = f" loading {m.loaded_bytes / 2**20:.1f} MiB" if m.loading else ""
        loading += " (waiting for host-cache room)" if m.waiting_for_room else ""
        where = f" on {','.join(m.resident_on)}" if m.resident_on else ""
        print(f"  {m.id:32} {m.tier:8} {m.weight_bytes / 2**20:9.1f} MiB {m.requests:4} requests"
              f"{where}{loading}  {m.folder}")


def _call(args: argparse.Namespace, method: str, request):
    """One admin call -> its reply; a refusal becomes ValueError('STATUS: details')."""
    import grpc
    from tokenpool.protos.v1 import admin_pb2_grpc

    from .admin_token import client_token_file, read_admin_token
    from .server_security import client_channel

    token = read_admin_token(client_token_file(args.admin_token_file))
    with client_channel(args.server, args) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            return getattr(stub, method)(request, timeout=ADMIN_TIMEOUT_S,
                                         metadata=[("authorization", f"Bearer {token}")])
        except grpc.RpcError as exc:
            raise ValueError(f"{exc.code().name}: {exc.details()}") from None
