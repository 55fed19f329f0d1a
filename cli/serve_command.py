"""`tokenpool serve`: the models behind the public gRPC API on this machine.

One process for now: the proxy's Inference service over an in-process switching
engine. The disaggregated stack (`tokenpool up`) replaces the backend, not the API.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tokenpool.engine.model_store import DEFAULT_MODEL, ModelStore

from .instance_setup import add_engine_args, build_engine
from .models_command import ensure_model

TINY = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral")


def add_parser(commands) -> None:
    p = commands.add_parser("serve", help="serve models over gRPC (tokenpool.v1.Inference)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--model", action="append", default=[], metavar="ID[=FOLDER]",
                   help=f"a model to serve (repeatable; default: {DEFAULT_MODEL} and the tiny models)")
    add_engine_args(p)
    p.add_argument("--table-slots", type=int, default=1024,
                   help="request table size: requests in flight at most (more get RESOURCE_EXHAUSTED)")
    p.set_defaults(run=run)


def catalogue(specs: list[str]) -> dict[str, Path]:
    """--model values -> {id: folder}; the default catalogue when none is given."""
    if not specs:
        store = ModelStore()
        if not all(store.path_for(n).is_dir() for n in TINY):
            from tokenpool.engine.tiny_models import make_tiny_models

            make_tiny_models(store.root)
        specs = [DEFAULT_MODEL, *TINY]
    models = {}
    for spec in specs:
        model_id, _, folder = spec.partition("=")
        if not model_id or model_id in models:
            raise ValueError(f"--model {spec!r}: give each model a distinct, non-empty id")
        models[model_id] = ensure_model(folder or model_id)
    return models


def run(args: argparse.Namespace) -> None:
    import uvloop

    uvloop.run(_serve(args, catalogue(args.model)))


async def _serve(args: argparse.Namespace, folders: dict[str, Path]) -> None:
    from tokenpool.protos.v1 import inference_pb2_grpc
    from tokenpool.proxy.inference_servicer import InferenceServicer
    from tokenpool.proxy.local_backend import LocalBackend
    from tokenpool.proxy.request_table import make_request_table
    from tokenpool.proxy.served_model import served_models
    from tokenpool.proxy.stop_serving import stop_serving

    from .service_process import start_grpc_server, wait_for_signal

    engine = build_engine(args, folders)
    served = served_models(engine)
    backend = LocalBackend(engine)
    table = make_request_table("shm", name=f"serve-{os.getpid()}", capacity=args.table_slots, create=True)
    servicer = InferenceServicer(backend, served, table)
    server = await start_grpc_server(f"{args.host}:{args.port}", [
        (inference_pb2_grpc.add_InferenceServicer_to_server, servicer)], ["tokenpool.v1.Inference"])
    print(f"tokenpool: serving {', '.join(served)} on {server.address} "
          f"(tokenpool.v1.Inference; health and reflection on)", flush=True)
    await wait_for_signal()
    print("tokenpool: shutting down", file=sys.stderr, flush=True)
    await stop_serving(server, servicer, 0.0, "the server is shutting down")
    await backend.close()
    servicer.close()
    engine.close()
    table.close()
    table.unlink()
