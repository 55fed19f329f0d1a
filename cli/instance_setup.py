"""What every process that runs an engine shares: its flags and how the switching engine is built.

`tokenpool serve`, a prefill instance and a decode instance all take the same model and
memory flags and build one MultiModelEngine over the node's host model cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_engine_args(p: argparse.ArgumentParser, kv_mib: int = 256, host_kv_mib: int = 512) -> None:
    p.add_argument("--dtype", default="auto", help="weights: auto (the checkpoint's), float32, bfloat16")
    p.add_argument("--kv-mib", type=int, default=kv_mib, help="device KV region, MiB")
    p.add_argument("--host-kv-mib", type=int, default=host_kv_mib,
                   help="this instance's host KV pool (swapped-out sequences), MiB")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: torch's)")
    p.add_argument("--engine", default="native", choices=["native", "vllm"],
                   help="model backend: native (tokenpool's model code and kernels) or vllm (vLLM's model "
                        "classes and attention kernels in the same arena; the tokenpool[vllm] extra)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the arena (weights and KV) lives; on cuda the host model cache and KV pool "
                        "are page-locked for DMA")
    p.add_argument("--catalogue", type=Path, default=None, metavar="DIR",
                   help="serve every model folder under DIR, registered lazily (config and tokenizer now, "
                        "weights from disk on first use)")
    p.add_argument("--slot-mib", type=int, default=None,
                   help="each arena model slot, MiB (default: the largest model given; set it to add larger "
                        "models at run time)")
    p.add_argument("--host-cache-mib", type=int, default=None,
                   help="the node's host model cache capacity, MiB (default 8192)")
    p.add_argument("--host-cache-dir", type=Path, default=None, metavar="DIR",
                   help="the node's host model cache folder (default /dev/shm/tokenpool-<uid>/models)")
    p.add_argument("--load-wait-s", type=float, default=None, metavar="S",
                   help="how long a catalogue model's disk load waits for host-cache room held by models "
                        "in use or with work before its requests fail RESOURCE_EXHAUSTED (default 120)")


def parse_models(specs: list[str]) -> dict[str, Path]:
    """ID=FOLDER or ID (a model in the store) values -> {id: folder}; ValueError on a repeated or
    empty id, FileNotFoundError when the folder holds no model."""
    from tokenpool.engine.model_store import ModelStore

    models = {}
    for spec in specs:
        model_id, _, folder = spec.partition("=")
        if not model_id or model_id in models:
            raise ValueError(f"--model {spec!r}: expected ID=FOLDER or ID, with a distinct, non-empty id")
        path = Path(folder) if folder else ModelStore().path_for(model_id)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec!r}: no config.json in {path}")
        models[model_id] = path
    return models


def catalogue_models(args: argparse.Namespace, folders: dict[str, Path]) -> dict[str, Path]:
    """--catalogue's model folders (none without the flag); ValueError on an id that --model
    also names, or when neither flag names a model."""
    from tokenpool.engine.model_catalogue import scan_catalogue

    catalogue = scan_catalogue(Path(args.catalogue).resolve()) if getattr(args, "catalogue", None) else {}
    if clash := sorted(set(catalogue) & set(folders)):
        raise ValueError(f"--catalogue {args.catalogue}: ids also given by --model: {', '.join(clash)}")
    if not catalogue and not folders:
        raise ValueError("no models: give --model ID[=FOLDER] or --catalogue DIR")
    return catalogue


def _mib(args: argparse.Namespace, name: str) -> int:
    """An optional MiB flag's value (0 when not given); ValueError naming it when below 1."""
    mib = getattr(args, name, None)
    if mib is not None and mib < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {mib}")
    return mib or 0


def host_model_cache(args: argparse.Namespace):
    """The node's host model cache as --host-cache-mib and --host-cache-dir say."""
    from tokenpool.engine.host_model_cache import HostModelCache

    mib = _mib(args, "host_cache_mib")
    capacity = {"capacity_bytes": mib << 20} if mib else {}
    return HostModelCache(getattr(args, "host_cache_dir", None), **capacity)


def build_engine(args: argparse.Namespace, folders: dict[str, Path], in_fleet: bool = False):
    """A MultiModelEngine with every model registered (its slots fit the largest one): --model's
    now, --catalogue's lazily (weights from disk when first needed). in_fleet: an instance whose
    catalogue the proxy brings in step when it joins; a model whose id another instance on the node
    serves from another checkpoint now (changed at run time) is left out, with an error on stderr,
    instead of failing the start (as a standalone server does)."""
    from tokenpool.engine.host_kv_pool import HostKVPool
    from tokenpool.engine.llm_engine import EngineConfig
    from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine, slot_bytes_for

    catalogue = catalogue_models(args, folders)
    config = EngineConfig(dtype=args.dtype, num_threads=args.threads, device=args.device, engine=args.engine)
    slot = max(slot_bytes_for([*folders.values(), *catalogue.values()], config), _mib(args, "slot_mib") << 20)
    wait = getattr(args, "load_wait_s", None)
    if wait is not None and not wait >= 0:
        raise ValueError(f"--load-wait-s must be >= 0, got {wait}")
    memory = InstanceConfig(kv_bytes=args.kv_mib << 20, slot_bytes=slot, engine=config,
                            **({"load_wait_s": wait} if wait is not None else {}))
    pool = HostKVPool(args.host_kv_mib << 20, slab_bytes=4 << 20, pin=args.device == "cuda")
    engine = MultiModelEngine(memory, host_model_cache(args), pool)
    try:
        left_out = []
        for lazy, models in ((False, folders), (True, catalogue)):
            for model_id, folder in models.items():
                if not _registered(engine, model_id, folder, lazy, in_fleet):
                    left_out.append(model_id)
        if left_out and not engine.models:
            raise ValueError(f"no model could be registered ({', '.join(left_out)}: see the errors above)")
    except BaseException:
        engine.close()
        raise
    return engine


def _registered(engine, model_id: str, folder: Path, lazy: bool, in_fleet: bool) -> bool:
    from tokenpool.engine.host_model_cache import ModelConflictError

    try:
        engine.register(model_id, folder, lazy=lazy)
    except ModelConflictError as exc:
        if not in_fleet:
            raise
        print(f"tokenpool: error: {model_id} not registered: {exc}; the proxy brings this instance's "
              f"catalogue in step when it joins", file=sys.stderr, flush=True)
        return False
    return True
