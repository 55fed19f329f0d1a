"""The model catalogue in a running stack: `--catalogue DIR` with 200 ids over four shapes of tiny
checkpoints and a host cache holding a few of them; the admin API and `tokenpool models ...`
changing the catalogue while traffic runs; bad admin input refused with nothing half-registered."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import cut_layers
from stack_helpers import SMALL_STACK, instance_status, service, stream, wait_until_idle
from tokenpool.cli.admin_token import AdminGuard
from tokenpool.cli.main import main as cli_main
from tokenpool.compose.launcher import Stack, StackConfig
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.protos.v1 import admin_pb2 as apb
from tokenpool.protos.v1 import admin_pb2_grpc, inference_pb2_grpc
from tokenpool.protos.v1 import inference_pb2 as pb
from waiting import wait_for

NUM_IDS = 200  # start-up stays a few seconds: instances read configs and tokenizers, not weights
HOST_CACHE_MIB = 24  # ~7% of the catalogue's ~330 MiB (models up to 2.2 MiB; an instance pins up to two)
PROMPT = "The quick brown fox"
NEW_TOKENS = 4
WAIT_S = 120.0  # an upper bound for waits on status, never a sleep
BURST_TOKENS = 32  # long enough that decode turns (and their loads) overlap the prefills
INSTANCES = ("prefill-0", "decode-0", "decode-1")


@pytest.fixture(scope="module")
def shapes(tiny_dir, tmp_path_factory):
    """Four shapes; tiny-llama (the largest tiny model) is left out: it is the model too large for
    the arena slots sized by the catalogue."""
    root = tmp_path_factory.mktemp("shapes")
    folders = {name: tiny_dir / name for name in ("tiny-qwen2", "tiny-qwen3", "tiny-mistral")}
    folders["tiny-llama-1l"] = cut_layers(tiny_dir / "tiny-llama", root / "tiny-llama-1l", 1)
    return folders


@pytest.fixture(scope="module")
def catalogue(shapes, tmp_path_factory):
    """{id: shape name} for NUM_IDS ids, each a symlink to one of the shapes' folders."""
    root = tmp_path_factory.mktemp("catalogue")
    names = sorted(shapes)
    ids = {}
    for i in range(NUM_IDS):
        ids[f"cat-{i:03d}"] = names[i % len(names)]
        (root / f"cat-{i:03d}").symlink_to(shapes[names[i % len(names)]])
    return root, ids


@pytest.fixture(scope="module")
def expected(shapes):
    """The single-model engine's greedy tokens for each shape's folder."""
    return {name: _engine_tokens(folder) for name, folder in shapes.items()}


def _engine_tokens(folder: Path) -> list[int]:
    engine = LLMEngine(folder, EngineConfig(dtype="float32"))
    [output] = engine.generate([PROMPT], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    return output.output_token_ids


@pytest.fixture(scope="module")
def repointed(shapes, tmp_path_factory):
    """(folder, its greedy tokens) of a one-layer cut of tiny-qwen2: a folder an id of tiny-qwen2 is
    pointed at at run time (it fits tiny-qwen2's slots, its tokenizer is the same, its tokens not)."""
    folder = cut_layers(shapes["tiny-qwen2"], tmp_path_factory.mktemp("repointed") / "qwen2-1l", 1)
    return folder, _engine_tokens(folder)


def _repoint(admin, token_file, model_id: str, folder: Path) -> None:
    """Remove model_id and add it again from folder (an id of the flags now served from elsewhere)."""
    admin.RemoveModel(apb.ModelRef(id=model_id), metadata=_auth(token_file), timeout=WAIT_S)
    admin.AddModel(apb.AddModelRequest(id=model_id, folder=str(folder)), metadata=_auth(token_file),
                   timeout=WAIT_S)


@pytest.fixture(scope="module")
def host_cache_dir():
    import tempfile

    from tokenpool.engine.private_shm import private_dir, shm_root

    with tempfile.TemporaryDirectory(dir=private_dir(shm_root())) as folder:
        yield folder


@pytest.fixture(scope="module")
def stack(catalogue, token_file, host_cache_dir, tmp_path_factory):
    config = StackConfig(models={}, catalogue=catalogue[0], host_cache_mib=HOST_CACHE_MIB,
                         host_cache_dir=host_cache_dir, admin_token_file=token_file, **SMALL_STACK)
    with Stack(config, tmp_path_factory.mktemp("logs")) as stack:
        stack.start(progress=lambda line: None)
        yield stack


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def admin(stack):
    with grpc.insecure_channel(stack.address) as channel:
        yield admin_pb2_grpc.AdminStub(channel)


def _auth(token_file) -> list:
    return [("authorization", f"Bearer {token_file.read_text().strip()}")]


def _greedy(stub, model: str) -> list[int]:
    return [t for r in stream(stub, model, PROMPT, NEW_TOKENS) for t in r.token_ids]


class CacheWatch:
    """Samples the host cache folder's segment bytes on a thread, as fast as it can."""

    def __init__(self, folder) -> None:
        self.folder, self.peak, self.samples = folder, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            used = 0
            for entry in os.scandir(self.folder):
                if entry.name.endswith(".seg"):
                    try:
                        used += entry.stat().st_size
                    except FileNotFoundError:
                        pass
            self.peak, self.samples = max(self.peak, used), self.samples + 1
            self._stop.wait(0.005)


def test_a_workload_over_every_id_gives_each_folders_tokens_within_the_host_cache(
        stack, stub, catalogue, expected, host_cache_dir):
    ids = catalogue[1]
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    assert sorted(m.id for m in listed) == sorted(ids)
    assert {m.state for m in listed} <= {"disk", "host", "resident"}
    with CacheWatch(host_cache_dir) as watch, ThreadPoolExecutor(8) as pool:
        got = dict(zip(ids, pool.map(lambda m: _greedy(stub, m), ids), strict=True))
    for model_id, shape in ids.items():
        assert got[model_id] == expected[shape], model_id
    assert watch.samples > 10 and 0 < watch.peak <= HOST_CACHE_MIB << 20, watch.peak
    states = [m.state for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models]
    assert states.count("disk") > NUM_IDS // 2, "the cache holds only a fraction of the catalogue"
    loads = sum(instance_status(stack, name).cold_loads for name in INSTANCES)
    assert loads >= NUM_IDS, "every id was read from disk at least once (once per node, by some instance)"
    wait_until_idle(stack, timeout=WAIT_S)


def test_tiers_and_loads_show_in_status_and_metrics(stack, stub, capsys):
    import urllib.request

    with urllib.request.urlopen(service(stack, "prefill-0").metrics_url, timeout=30) as reply:
        text = reply.read().decode()
    loads = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("tokenpool_model_cold_loads_total "))
    assert loads >= 1
    tiers = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
             if line.startswith("tokenpool_catalogue_models{")}
    assert set(tiers) == {"disk", "host", "resident"} and sum(tiers.values()) >= NUM_IDS, tiers
    assert cli_main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"models: {NUM_IDS} (" in out and "on disk)" in out and "disk loads: " in out, out


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


class Traffic:
    """Greedy streams over some ids on threads until stopped; every failure is kept."""

    def __init__(self, stub, ids: dict[str, str], expected) -> None:
        self.stub, self.ids, self.expected = stub, ids, expected
        self.failures: list[str] = []
        self.done = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(3)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()

    def _run(self, offset: int) -> None:
        names = sorted(self.ids)
        i = offset
        while not self._stop.is_set():
            model = names[i % len(names)]
            i += 3
            try:
                tokens = _greedy(self.stub, model)
            except grpc.RpcError as exc:
                self.failures.append(f"{model}: {exc.code().name} {exc.details()}")
                continue
            if tokens != self.expected[self.ids[model]]:
                self.failures.append(f"{model}: tokens {tokens}")
            self.done += 1


def _wait_tier(admin, token_file, model_id: str, tiers: set[str]) -> apb.CatalogueEntry:
    deadline = time.monotonic() + WAIT_S
    while True:
        entry = next(m for m in admin.ListCatalogue(apb.ListCatalogueRequest(), metadata=_auth(token_file),
                                                    timeout=30).models if m.id == model_id)
        if entry.tier in tiers or time.monotonic() > deadline:
            return entry
        time.sleep(0.05)


def test_add_preload_evict_remove_through_the_cli_while_traffic_runs(
        stack, stub, admin, catalogue, shapes, expected, token_file, capsys):
    ids = catalogue[1]
    busy = {m: ids[m] for m in _room_for_the_test(admin, token_file)}
    server = ["--server", stack.address, "--admin-token-file", str(token_file)]
    with Traffic(stub, busy, expected) as traffic:
        wait_for(lambda: traffic.done >= len(busy) or traffic.failures,  # every busy model loaded
                 timeout_s=WAIT_S)
        code, out, err = _cli(capsys, "models", "add", "added-qwen3", str(shapes["tiny-qwen3"]), *server)
        assert code == 0 and out.startswith("added added-qwen3") and "3 instances" in out, (out, err)
        assert _greedy(stub, "added-qwen3") == expected["tiny-qwen3"]

        cold = next(m for m in sorted(ids, reverse=True) if m not in busy)
        code, out, err = _cli(capsys, "models", "preload", cold, *server)
        assert code == 0 and out.startswith(f"preloading {cold}"), (out, err)
        assert _wait_tier(admin, token_file, cold, {"host", "resident"}).tier == "host"
        code, out, err = _cli(capsys, "models", "evict", cold, *server)
        assert code == 0 and out == f"evicted {cold} from the host cache (tier disk)", (out, err)

        code, out, err = _cli(capsys, "models", "list", *server)
        assert code == 0 and out.splitlines()[0].startswith(f"{NUM_IDS + 1} models: "), out

        _refuse_removal_with_a_request_in_flight(stack, stub, capsys, server)

        code, out, err = _remove_once_ended(capsys, "added-qwen3", server)
        assert code == 0 and out == "removed added-qwen3 from 3 instances", (out, err)
        with pytest.raises(grpc.RpcError) as info:
            _greedy(stub, "added-qwen3")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        code, out, err = _cli(capsys, "models", "remove", "added-qwen3", *server)
        assert code == 2 and err.startswith("tokenpool: error: NOT_FOUND: "), err
        started = traffic.done
        wait_for(lambda: traffic.done >= started + len(busy) or traffic.failures,  # it goes on
                 timeout_s=WAIT_S)
    assert not traffic.failures, traffic.failures
    assert all("added-qwen3" not in instance_status(stack, n).models for n in INSTANCES)
    wait_until_idle(stack, timeout=WAIT_S)


HELD_TOKENS = 300  # far from done when the first arrives: the decode instances are stopped right after
BUSY_MODELS = 6  # the traffic's models: with the two the test adds, well inside the host cache


def _room_for_the_test(admin, token_file) -> list[str]:
    """The traffic's models: those the host cache holds and instances keep attached, then others
    up to BUSY_MODELS; every other model is evicted, so that nothing this test loads is evicted
    again before it looks (the cache's victims are not this test's to choose)."""
    auth = _auth(token_file)
    cached = [m.id for m in admin.ListCatalogue(apb.ListCatalogueRequest(), metadata=auth, timeout=30).models
              if m.tier != "disk"]
    kept = []
    for model_id in cached:
        try:
            admin.EvictModel(apb.ModelRef(id=model_id), metadata=auth, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
            kept.append(model_id)  # attached by an instance (its slot's last fill, or pinned)
    assert len(kept) <= BUSY_MODELS, kept
    others = [m for m in sorted(cached) + [f"cat-{i:03d}" for i in range(NUM_IDS)] if m not in kept]
    return kept + others[:BUSY_MODELS - len(kept)]



def _refuse_removal_with_a_request_in_flight(stack, stub, capsys, server) -> None:
    """A stream held in flight (the decode instances stopped after its first token) makes the
    removal of its model fail FAILED_PRECONDITION naming the count; the stream then completes."""
    request = pb.GenerateRequest(model="added-qwen3", text=PROMPT, sampling=pb.SamplingParams(
        max_tokens=HELD_TOKENS, ignore_eos=True))
    responses = stub.Generate(request, timeout=WAIT_S)
    first = next(responses)
    pids = [service(stack, n).process.pid for n in ("decode-0", "decode-1")]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        code, out, err = _cli(capsys, "models", "remove", "added-qwen3", *server)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert code == 2 and err.startswith("tokenpool: error: FAILED_PRECONDITION: ") \
        and "1 requests in flight" in err, err
    tokens = list(first.token_ids) + [t for r in responses for t in r.token_ids]
    assert len(tokens) == HELD_TOKENS


def _remove_once_ended(capsys, model: str, server: list[str]) -> tuple[int, str, str]:
    """`models remove`, asked again while the proxy still counts the held stream: it ends that
    request's bookkeeping just after the client has the last message (a busy core widened the
    gap enough for the first try to be refused), and a user retries as the refusal says."""
    deadline = time.monotonic() + WAIT_S
    while True:
        code, out, err = _cli(capsys, "models", "remove", model, *server)
        if code == 0 or "requests in flight" not in err or time.monotonic() > deadline:
            return code, out, err
        time.sleep(0.05)


def _models_everywhere(stack, stub) -> tuple:
    return (tuple(sorted(m.id for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models)),
            *(tuple(instance_status(stack, n).models) for n in INSTANCES))


@pytest.mark.parametrize("change, code, needle", [
    ("no token", grpc.StatusCode.UNAUTHENTICATED, "admin token"),
    ("wrong token", grpc.StatusCode.UNAUTHENTICATED, "admin token"),
    ("empty folder", grpc.StatusCode.INVALID_ARGUMENT, "no config.json"),
    ("no weights", grpc.StatusCode.INVALID_ARGUMENT, "safetensors"),
    ("relative folder", grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
    ("duplicate id", grpc.StatusCode.ALREADY_EXISTS, "already served"),
    ("path id", grpc.StatusCode.INVALID_ARGUMENT, "not allowed"),
    ("dots id", grpc.StatusCode.INVALID_ARGUMENT, "not allowed"),
    ("too large", grpc.StatusCode.INVALID_ARGUMENT, "slot"),
    ("remove unknown", grpc.StatusCode.NOT_FOUND, "not served"),
    ("evict unknown", grpc.StatusCode.NOT_FOUND, "not served"),
    ("preload unknown", grpc.StatusCode.NOT_FOUND, "not served"),
])
def test_bad_admin_input_gets_a_clear_status_and_leaves_nothing_half_registered(
        stack, stub, admin, shapes, tiny_dir, token_file, tmp_path, change, code, needle):
    before = _models_everywhere(stack, stub)
    auth = _auth(token_file)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (shapes["tiny-qwen2"] / name).exists():
            (no_weights / name).write_bytes((shapes["tiny-qwen2"] / name).read_bytes())
    add = {
        "no token": ("ok-id", shapes["tiny-qwen2"], []),
        "wrong token": ("ok-id", shapes["tiny-qwen2"], [("authorization", "Bearer nope")]),
        "empty folder": ("ok-id", tmp_path, auth),
        "no weights": ("ok-id", no_weights, auth),
        "relative folder": ("ok-id", "tiny-qwen2", auth),
        "duplicate id": ("cat-000", shapes["tiny-qwen2"], auth),
        "path id": ("a/b", shapes["tiny-qwen2"], auth),
        "dots id": ("..", shapes["tiny-qwen2"], auth),
        "too large": ("ok-id", tiny_dir / "tiny-llama", auth),
    }
    with pytest.raises(grpc.RpcError) as info:
        if change in add:
            model_id, folder, metadata = add[change]
            request = apb.AddModelRequest(id=model_id, folder=str(folder))
            admin.AddModel(request, metadata=metadata, timeout=60)
        else:
            method = {"remove": admin.RemoveModel, "evict": admin.EvictModel, "preload": admin.PreloadModel}
            method[change.split()[0]](apb.ModelRef(id="no-such-model"), metadata=auth, timeout=60)
    assert info.value.code() == code, info.value.details()
    assert needle in info.value.details(), info.value.details()
    assert _models_everywhere(stack, stub) == before


def test_a_proxy_without_an_admin_token_refuses_every_admin_call():
    code, message = AdminGuard(None).refusal([("authorization", "Bearer anything")])
    assert code == grpc.StatusCode.PERMISSION_DENIED and "--admin-token-file" in message
    assert AdminGuard("t").refusal([("authorization", "Bearer t")]) is None


def test_up_takes_a_catalogue_and_hands_it_to_every_service(catalogue, tmp_path):
    from tokenpool.cli.main import build_parser
    from tokenpool.cli.up_command import stack_config

    token = tmp_path / "admin"
    args = build_parser().parse_args(["up", "--catalogue", str(catalogue[0]), "--host-cache-mib", "64",
                                      "--slot-mib", "8", "--admin-token-file", str(token)])
    config = stack_config(args)
    assert (config.models, config.catalogue, config.host_cache_mib) == ({}, catalogue[0], 64)
    launcher = Stack(config, tmp_path / "logs")
    instance = launcher._catalogue_args("decode")
    proxy = launcher._catalogue_args("proxy")
    assert instance == ["--catalogue", str(catalogue[0]), "--host-cache-mib", "64", "--slot-mib", "8"]
    args = build_parser().parse_args(["up", "--catalogue", str(catalogue[0]), "--load-wait-s", "30"])
    waiting = Stack(stack_config(args), tmp_path / "logs")._catalogue_args("prefill")
    assert waiting[-2:] == ["--load-wait-s", "30.0"]
    args = build_parser().parse_args(["up", "--catalogue", str(catalogue[0]), "--host-cache-dir", "cache",
                                      "--nodes", "2"])
    two_nodes = Stack(stack_config(args), tmp_path / "logs")
    here = Path("cache").resolve()  # resolved once: every service gets the same folder
    assert two_nodes._catalogue_args("prefill", 0)[-2:] == ["--host-cache-dir", str(here)]
    assert two_nodes._catalogue_args("decode", 1)[-2:] == ["--host-cache-dir", f"{here}-node-1"]
    assert proxy == ["--catalogue", str(catalogue[0]), "--admin-token-file", str(token)]
    with pytest.raises(ValueError, match="host_cache_mib must be >= 1"):
        StackConfig(models={}, catalogue=catalogue[0], host_cache_mib=0)
    with pytest.raises(ValueError, match="at least one model"):
        StackConfig(models={})


def test_a_load_whose_room_stays_held_fails_resource_exhausted_and_serves_once_it_frees(
        tiny_dir, tmp_path_factory):
    """A host cache with room for one model, held by a lease (as an instance's would be): a request
    for another model waits --load-wait-s for room, then fails RESOURCE_EXHAUSTED naming the model
    that holds it; once the lease goes, the same request gets the single-model engine's tokens."""
    from tokenpool.engine.host_model_cache import HostModelCache
    from tokenpool.engine.private_shm import private_dir, shm_root

    root = tmp_path_factory.mktemp("two-ids")
    for model_id in ("held", "cold"):
        (root / model_id).symlink_to(tiny_dir / "tiny-qwen3")  # 2.0 MiB each in float32
    expected = LLMEngine(tiny_dir / "tiny-qwen3", EngineConfig(dtype="float32")).generate(
        [PROMPT], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[0].output_token_ids
    with tempfile.TemporaryDirectory(dir=private_dir(shm_root())) as cache_dir:
        config = StackConfig(models={}, catalogue=root, host_cache_mib=3, host_cache_dir=cache_dir,
                             load_wait_s=1.0, **{**SMALL_STACK, "decode": 1, "prefill": 1})
        with Stack(config, tmp_path_factory.mktemp("logs")) as stack:
            stack.start(progress=lambda line: None)
            with grpc.insecure_channel(stack.address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                assert _greedy(stub, "held") == expected
                lease = HostModelCache(Path(cache_dir), capacity_bytes=3 << 20, progress=False).attach("held")
                with ThreadPoolExecutor(1) as pool:
                    cold = pool.submit(_greedy, stub, "cold")
                    seen = False  # the wait shows in the instance's status while it lasts (1 s)
                    while not cold.done() and not seen:
                        seen = any(x.waiting_for_room for x in instance_status(stack, "prefill-0").loads)
                    with pytest.raises(grpc.RpcError) as refused:
                        cold.result()
                assert seen, "the load's wait for room never showed in the instance's status"
                why = refused.value.details()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, why
                assert "'held'" in why and "waited 1 s for room" in why, why
                lease.close()
                assert _greedy(stub, "cold") == expected
                wait_until_idle(stack, timeout=WAIT_S)


def test_a_burst_over_models_of_which_the_cache_holds_one_completes(tiny_dir, tmp_path_factory):
    """200 streams at once over four ids of 2.0-2.4 MiB through a 4 MiB cache: every load must evict
    the one model cached, which the prefill queue keeps while it has a group for it. A prefill whose
    model waits for room lets such a group go first, which frees the room (before, the turn waited
    for the load, the load for the room, the room for the turn: the load wait ran out and streams
    failed RESOURCE_EXHAUSTED)."""
    from tokenpool.engine.private_shm import private_dir, shm_root

    root = tmp_path_factory.mktemp("burst")
    ids = {"l-a": "tiny-llama", "m-b": "tiny-mistral", "m-c": "tiny-mistral", "q-d": "tiny-qwen3"}
    for model_id, shape in ids.items():
        (root / model_id).symlink_to(tiny_dir / shape)
    expected = {shape: LLMEngine(tiny_dir / shape, EngineConfig(dtype="float32")).generate(
        [PROMPT], SamplingParams(max_tokens=BURST_TOKENS, ignore_eos=True))[0].output_token_ids
        for shape in set(ids.values())}
    order = list(ids)
    with tempfile.TemporaryDirectory(dir=private_dir(shm_root())) as cache_dir:
        config = StackConfig(models={}, catalogue=root, host_cache_mib=4, host_cache_dir=cache_dir,
                             load_wait_s=WAIT_S, **{**SMALL_STACK, "decode": 1, "prefill": 1})
        with Stack(config, tmp_path_factory.mktemp("logs")) as stack:
            stack.start(progress=lambda line: None)
            with grpc.insecure_channel(stack.address) as channel, CacheWatch(cache_dir) as watch, \
                    ThreadPoolExecutor(40) as pool:
                stub = inference_pb2_grpc.InferenceStub(channel)
                got = list(pool.map(lambda i: [t for r in stream(stub, order[i % 4], PROMPT, BURST_TOKENS)
                                               for t in r.token_ids], range(200)))
            for i, tokens in enumerate(got):
                assert tokens == expected[ids[order[i % 4]]], i
            assert watch.peak <= 4 << 20, watch.peak
            wait_until_idle(stack, timeout=WAIT_S)


def _qwen2_stack(shapes, token_file, tmp_path_factory, ids: tuple[str, ...], decode: int) -> Stack:
    """A stack (not started) of 1 prefill and `decode` decode instances whose catalogue folder holds
    tiny-qwen2 under each of ids, with the admin service on."""
    root = tmp_path_factory.mktemp("catalogue")
    for model_id in ids:
        (root / model_id).symlink_to(shapes["tiny-qwen2"])
    config = StackConfig(models={}, catalogue=root, admin_token_file=token_file,
                         **{**SMALL_STACK, "decode": decode, "prefill": 1})
    return Stack(config, tmp_path_factory.mktemp("logs"))


def test_an_instance_out_of_service_during_changes_is_brought_in_step_before_it_serves(
        shapes, expected, token_file, tmp_path_factory):
    """decode-1 hung (SIGSTOP) past the proxy's health checks: add and remove go to the instances in
    service and say which one is out; when decode-1 answers again it is given the added model and
    loses the removed one before it takes work (an instance restarted from its flags meanwhile, as
    Kubernetes does, would start without them), and then serves the added model's requests."""
    with _qwen2_stack(shapes, token_file, tmp_path_factory, ("kept", "gone"), decode=2) as stack:
        stack.start(progress=lambda line: None)
        channel = grpc.insecure_channel(stack.address)
        admin, stub = admin_pb2_grpc.AdminStub(channel), inference_pb2_grpc.InferenceStub(channel)
        hung, log = service(stack, "decode-1").process, service(stack, "proxy").log
        hung.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: "instance decode-1 lost" in log.read_text(), timeout_s=WAIT_S)
            reply = admin.AddModel(apb.AddModelRequest(id="late", folder=str(shapes["tiny-qwen2"])),
                                   metadata=_auth(token_file), timeout=WAIT_S)
            assert "on 2 instances" in reply.message and "decode-1 out of service" in reply.message, reply
            reply = admin.RemoveModel(apb.ModelRef(id="gone"), metadata=_auth(token_file), timeout=WAIT_S)
            assert "from 2 instances" in reply.message, reply.message
        finally:
            hung.send_signal(signal.SIGCONT)
        synced = "instance decode-1 answers again: added ['late'], removed ['gone']"
        wait_for(lambda: synced in log.read_text(), timeout_s=WAIT_S)
        wait_for(lambda: "instance decode-1 answers again; it rejoins" in log.read_text(), timeout_s=WAIT_S)
        assert sorted(instance_status(stack, "decode-1").models) == ["kept", "late"]
        for _ in range(4):  # both decode instances take work again: every stream completes
            assert _greedy(stub, "late") == expected["tiny-qwen2"]
        wait_until_idle(stack, timeout=WAIT_S)
        channel.close()


def _restart_while_the_proxy_is_frozen(stack: Stack, name: str, check=lambda: None) -> str:
    """Kill instance `name` and start it again from its flags while the proxy is frozen (SIGSTOP), so
    that none of the proxy's health checks fails; check() runs before the proxy thaws -> the proxy's
    log once the instance has rejoined."""
    proxy, old = service(stack, "proxy"), service(stack, name)
    proxy.process.send_signal(signal.SIGSTOP)
    try:
        old.process.kill()
        old.process.wait()
        stack.restart(old, progress=lambda line: None)
        check()
    finally:
        proxy.process.send_signal(signal.SIGCONT)
    wait_for(lambda: f"instance {name} answers again; it rejoins" in proxy.log.read_text(), f"{name} rejoins",
             timeout_s=WAIT_S)
    return proxy.log.read_text()


def test_an_instance_restarted_before_any_health_check_failed_is_brought_in_step(
        shapes, expected, token_file, tmp_path_factory):
    """decode-1 killed and started again on its address while the proxy was frozen (SIGSTOP), so no
    health check of the proxy's ever failed: the new process, started from its flags, lacks the model
    added at run time. The proxy knows it by the new incarnation its health check names, adds the
    model before it takes work (before, it sent decode-1 requests for a model it did not have), and
    every stream over both decode instances completes."""
    with _qwen2_stack(shapes, token_file, tmp_path_factory, ("kept",), decode=2) as stack:
        stack.start(progress=lambda line: None)
        channel = grpc.insecure_channel(stack.address)
        admin, stub = admin_pb2_grpc.AdminStub(channel), inference_pb2_grpc.InferenceStub(channel)
        admin.AddModel(apb.AddModelRequest(id="late", folder=str(shapes["tiny-qwen2"])),
                       metadata=_auth(token_file), timeout=WAIT_S)
        def lacks_late() -> None:
            assert "late" not in instance_status(stack, "decode-1").models  # its flags do not name it

        text = _restart_while_the_proxy_is_frozen(stack, "decode-1", lacks_late)
        assert "instance decode-1 answers again: added ['late']" in text, text[-2000:]
        assert "health checks failed" not in text, text[-2000:]  # the restart outran the probes
        assert "late" in instance_status(stack, "decode-1").models
        for _ in range(6):  # round the decode instances: every stream completes
            assert _greedy(stub, "late") == expected["tiny-qwen2"]
        wait_until_idle(stack, timeout=WAIT_S)
        channel.close()


def test_an_instance_restarted_from_flags_naming_an_id_served_from_elsewhere_now_is_re_pointed(
        shapes, expected, repointed, token_file, tmp_path_factory):
    """"kept", of the flags, removed and added again from another folder; then decode-1 killed and
    started again from its flags while the proxy was frozen: it holds "kept" from the flags' folder.
    The proxy compares folders, not only ids (before, it found decode-1 in step and decode-1 decoded
    "kept" with the old weights): decode-1 is given "kept" from its new folder before it takes work,
    and every stream over both decode instances gives the new folder's tokens."""
    folder, tokens = repointed
    assert tokens != expected["tiny-qwen2"]  # else the test could not tell the folders apart
    with _qwen2_stack(shapes, token_file, tmp_path_factory, ("kept", "other"), decode=2) as stack:
        stack.start(progress=lambda line: None)
        with grpc.insecure_channel(stack.address) as channel:  # (an instance keeps one model at least)
            _repoint(admin_pb2_grpc.AdminStub(channel), token_file, "kept", folder)
        text = _restart_while_the_proxy_is_frozen(stack, "decode-1")
        assert "instance decode-1 answers again: added ['kept'], removed ['kept']" in text, text[-2000:]
        with grpc.insecure_channel(stack.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for _ in range(6):  # round the decode instances
                assert _greedy(stub, "kept") == tokens
        wait_until_idle(stack, timeout=WAIT_S)


def test_an_instance_down_when_the_proxy_starts_is_brought_in_step_before_it_serves(
        shapes, expected, token_file, tmp_path_factory):
    """The proxy and decode-1 killed -9 together after a model was added at run time. The proxy comes
    back first (decode-1 does not answer its start) and is frozen (SIGSTOP) before its health checks
    could count decode-1 lost; decode-1 comes back from its flags, without the model. The proxy set it
    aside at start, since the catalogue it serves differs from the flags, so it adds the model before
    decode-1 takes work (before, decode-1's first good health check put it in service as it was, and
    it was sent requests for a model it did not have); every stream over both decode instances
    completes."""
    with _qwen2_stack(shapes, token_file, tmp_path_factory, ("kept",), decode=2) as stack:
        stack.start(progress=lambda line: None)
        with grpc.insecure_channel(stack.address) as channel:
            admin_pb2_grpc.AdminStub(channel).AddModel(
                apb.AddModelRequest(id="late", folder=str(shapes["tiny-qwen2"])),
                metadata=_auth(token_file), timeout=WAIT_S)
        proxy, down = service(stack, "proxy"), service(stack, "decode-1")
        for old in (proxy, down):
            old.process.kill()
            old.process.wait()
        proxy = stack.restart(proxy, progress=lambda line: None)
        proxy.process.send_signal(signal.SIGSTOP)
        try:
            stack.restart(down, progress=lambda line: None)
            assert "late" not in instance_status(stack, "decode-1").models  # its flags do not name it
        finally:
            proxy.process.send_signal(signal.SIGCONT)
        wait_for(lambda: "instance decode-1 answers again; it rejoins" in proxy.log.read_text(),
                 "decode-1 rejoins", timeout_s=WAIT_S)
        text = proxy.log.read_text()
        assert "instance decode-1 answers again: added ['late']" in text, text[-2000:]
        assert sorted(instance_status(stack, "decode-1").models) == ["kept", "late"]
        with grpc.insecure_channel(stack.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for _ in range(6):  # round the decode instances: every stream completes
                assert _greedy(stub, "late") == expected["tiny-qwen2"]
        wait_until_idle(stack, timeout=WAIT_S)


def test_a_restarted_proxy_serves_its_flags_and_the_models_added_at_run_time(shapes, expected, repointed,
                                                                             token_file, tmp_path_factory):
    """The proxy killed -9 and started again from its flags (as `tokenpool up` and Kubernetes do)
    serves the model added at run time, which the instances hold as such (before, it forgot it, and
    would have removed it from every instance that rejoined), and an id of the flags pointed at
    another folder at run time from that folder. A model of the flags removed at run time is served
    again, and given back to the instances: the flags are the configuration."""
    folder, tokens = repointed
    with _qwen2_stack(shapes, token_file, tmp_path_factory, ("kept", "gone", "moved"), decode=1) as stack:
        stack.start(progress=lambda line: None)
        with grpc.insecure_channel(stack.address) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            admin.AddModel(apb.AddModelRequest(id="late", folder=str(shapes["tiny-qwen2"])),
                           metadata=_auth(token_file), timeout=WAIT_S)
            admin.RemoveModel(apb.ModelRef(id="gone"), metadata=_auth(token_file), timeout=WAIT_S)
            _repoint(admin, token_file, "moved", folder)
        assert sorted(instance_status(stack, "decode-0").models) == ["kept", "late", "moved"]
        proxy = service(stack, "proxy")
        proxy.process.kill()
        proxy.process.wait()
        proxy = stack.restart(proxy, progress=lambda line: None)
        with grpc.insecure_channel(stack.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            assert sorted(m.id for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models) == \
                ["gone", "kept", "late", "moved"]
            for model_id in ("late", "kept", "gone"):
                assert _greedy(stub, model_id) == expected["tiny-qwen2"], model_id
            assert _greedy(stub, "moved") == tokens  # not put back to the flags' folder on the instances
        text = proxy.log.read_text()
        assert "catalogue taken from 2 instances: serving ['late', 'moved'], added at run time" in text, \
            text[-2000:]
        for name in ("prefill-0", "decode-0"):
            assert sorted(instance_status(stack, name).models) == ["gone", "kept", "late", "moved"], name
        wait_until_idle(stack, timeout=WAIT_S)
