"""The node's host model cache outlives the processes that fill it, and is keyed by model id: a copy
read from another checkpoint than the one an instance registers under that id (the id pointed at
another folder, or the files rewritten in place) is read again, never served; one another running
process still has attached is refused, naming both folders, with nothing registered."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.engine.host_model_cache import HostModelCache, ModelConflictError
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine
from tokenpool.engine.sampling_params import SamplingParams

PROMPT = "The quick brown fox"
NEW_TOKENS = 6
SAMPLING = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)


def _perturb(folder) -> None:
    """Rewrite folder's weights in place with other values of the same shapes (a fine-tune)."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    rng = np.random.default_rng(7)
    changed = {k: (v + rng.normal(0, 0.5, v.shape).astype(v.dtype)) if v.ndim == 2 else v
               for k, v in tensors.items()}
    save_file(changed, path)
    later = os.stat(path).st_mtime_ns + 10**9  # a rewrite within the clock's granularity still shows
    os.utime(path, ns=(later, later))


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory):
    """{name: folder}: tiny-qwen2 and a same-shape copy with other weights."""
    root = tmp_path_factory.mktemp("stale")
    other = shutil.copytree(tiny_dir / "tiny-qwen2", root / "tuned")
    _perturb(other)
    return {"base": tiny_dir / "tiny-qwen2", "tuned": other}


def _tokens(folder) -> list[int]:
    return LLMEngine(folder, EngineConfig(dtype="float32")).generate([PROMPT], SAMPLING)[0].output_token_ids


@pytest.fixture(scope="module")
def expected(folders):
    tokens = {name: _tokens(folder) for name, folder in folders.items()}
    assert tokens["base"] != tokens["tuned"]  # else the tests could not tell the checkpoints apart
    return tokens


def _engine(shm_path) -> MultiModelEngine:
    """An instance on the node whose host cache lives in shm_path/cache (the same for every call)."""
    cache = HostModelCache(shm_path / "cache", capacity_bytes=32 << 20, progress=False)
    pool = HostKVPool(8 << 20, slab_bytes=1 << 20, shm_dir=shm_path)
    config = InstanceConfig(kv_bytes=2 << 20, slot_bytes=4 << 20, engine=EngineConfig(dtype="float32"))
    return MultiModelEngine(config, cache, pool)


def _serve(engine: MultiModelEngine, model_id: str) -> list[int]:
    seq = engine.add_request(model_id, PROMPT, SAMPLING)
    engine.prefetch(model_id)
    while engine.has_unfinished(model_id):
        engine.step(model_id)
    return seq.output_token_ids


@pytest.mark.parametrize("lazy", [False, True], ids=["flags", "catalogue"])
def test_a_restart_with_the_id_pointed_at_another_folder_serves_the_new_weights(folders, expected, shm_path,
                                                                               lazy):
    """The stack stopped and started again with `--model m=OTHER` (before, the copy the first run
    left in /dev/shm was taken as m's, and the old weights served)."""
    first = _engine(shm_path)
    first.register("m", folders["base"], lazy=lazy)
    assert _serve(first, "m") == expected["base"]
    first.close()
    second = _engine(shm_path)
    second.register("m", folders["tuned"], lazy=lazy)
    if lazy:  # the stale copy is gone at once: the tier tells the truth before any request
        assert not second.cache.contains("m")
    assert _serve(second, "m") == expected["tuned"]
    assert second.cache.counters.evictions >= 1
    second.close()


def test_a_checkpoint_rewritten_in_place_is_read_again(folders, expected, tmp_path, shm_path):
    folder = shutil.copytree(folders["base"], tmp_path / "model")
    first = _engine(shm_path)
    first.register("m", folder)
    assert _serve(first, "m") == expected["base"]
    first.close()
    _perturb(folder)
    second = _engine(shm_path)
    second.register("m", folder)
    assert _serve(second, "m") != expected["base"]
    second.close()


@pytest.mark.parametrize("lazy", [False, True], ids=["flags", "catalogue"])
def test_a_copy_a_running_instance_holds_is_refused_naming_both_folders(folders, expected, shm_path, lazy):
    """Another instance on the node serves m from its folder and holds the copy attached: a
    registration of m from another folder is refused (it must not replace weights in use, nor be
    served them), and leaves nothing registered; the running one still serves its weights."""
    running = _engine(shm_path)
    running.register("m", folders["base"])  # attached: a model of the flags keeps its lease
    assert _serve(running, "m") == expected["base"]
    other = _engine(shm_path)
    with pytest.raises(ModelConflictError) as refused:
        other.register("m", folders["tuned"], lazy=lazy)
    assert str(folders["base"]) in str(refused.value) and str(folders["tuned"]) in str(refused.value)
    assert "--host-cache-dir" in str(refused.value)  # the remedy: a cache of its own (or another id)
    assert "m" not in other.models
    assert _serve(running, "m") == expected["base"]
    other.close()
    running.close()


def test_an_instance_in_a_fleet_starts_without_the_conflicting_model_and_a_standalone_one_refuses(
        folders, expected, shm_path, capsys):
    """An instance restarted from flags naming m=OTHER while another instance on the node serves m
    from the copy it holds attached (m re-pointed at run time): it starts without m, saying why, and
    the proxy gives it m as the fleet serves it when it joins; a standalone server (`tokenpool serve`)
    refuses to start instead."""
    import argparse

    from tokenpool.cli.instance_setup import add_engine_args, build_engine

    running = _engine(shm_path)
    running.register("m", folders["base"])
    assert _serve(running, "m") == expected["base"]
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--dtype", "float32", "--kv-mib", "2", "--host-kv-mib", "8", "--host-cache-mib",
                              "32", "--host-cache-dir", str(shm_path / "cache")])
    flags = {"m": folders["tuned"], "n": folders["base"]}
    with pytest.raises(ModelConflictError):
        build_engine(args, flags)
    joining = build_engine(args, flags, in_fleet=True)
    assert sorted(joining.models) == ["n"]
    assert "m not registered" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no model could be registered"):
        build_engine(args, {"m": folders["tuned"]}, in_fleet=True)
    assert _serve(running, "m") == expected["base"]
    joining.close()
    running.close()
