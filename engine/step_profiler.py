"""Profiling a model on this instance: the step-time and prefill-time models schedulers use.

    profile_model(engine, model)  ->  TimingProfile(decode: a + b*sum_seq_len + c*batch,
                                                    prefill: a + b*tokens, weight_bytes)

Synthetic requests (random token ids, ignore_eos) are run through the real engine: prompts
of several lengths for prefill, batches of several sizes and lengths for decode; a line is
fitted to each. A profile depends on the model's shape, dtype, threads and device, so it is
cached on disk under those (ProfileCache) and measured once per machine.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import time

import msgspec
import torch

from .multi_model_engine import MultiModelEngine
from .sampling_params import SamplingParams
from .step_time_model import (
    KVSwapTime,
    PrefillTimeModel,
    ProfileCache,
    ServingOverhead,
    StepTable,
    StepTimeModel,
    TimingProfile,
)

log = logging.getLogger(__name__)

PREFILL_LENGTHS = (16, 64, 192)
DECODE_SHAPES = ((1, 16), (1, 128), (2, 64), (4, 64), (8, 16), (8, 128))  # (batch size, prompt length)
DECODE_STEPS = 8  # timed, after one untimed step (the first decode step after a prefill runs slow)
DECODE_TOKENS = DECODE_STEPS + 3  # what a timed decode request asks for (and needs KV room for)
PROFILE_METHOD = 2  # part of the cache key: profiles measured by an older method are measured again
COPY_PROBE_BYTES = 64 << 20
TABLE_CONTEXT = 64  # measure_step_table: tokens per sequence
TABLE_BATCHES = (1, 2, 3, 4, 6, 8)
TABLE_SLOPE_BATCH, TABLE_SLOPE_CONTEXTS = 4, (16, 128)  # per_token from these two steps
TABLE_ROUNDS = 3  # each a median of DECODE_STEPS; the table holds the median round
KV_SWAP_BLOCKS = 32  # measure_kv_swap: one sequence of this many blocks (fewer if the region is smaller)
KV_SWAP_ROUNDS = 3
PREFETCH_ROUNDS = 6  # measure_prefetch_factor: prefetch copies timed against the steps beside them
PREFETCH_BATCH = 2
# The stand-in for the other instance while a prefetch is measured: one thread of matrix products.
_BUSY_CORE = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
              "print('busy', flush=True)\nwhile True:\n    a @ a\n")


def cached_profile(engine: MultiModelEngine, model_id: str,
                   cache: ProfileCache | None = None) -> TimingProfile:
    """The model's profile from the cache, else measured now (and cached)."""
    cache = cache or ProfileCache()
    key = profile_key(engine, model_id)
    profile = cache.get(key)
    if profile is None:
        start = time.perf_counter()
        profile = profile_model(engine, model_id)
        cache.put(key, profile)
        log.info("profiled %s in %.1f s: %s", model_id, time.perf_counter() - start, profile)
    return profile


def profile_key(engine: MultiModelEngine, model_id: str) -> str:
    model = engine.models[model_id]
    c = model.profile.config
    ec = engine.config.engine
    return ProfileCache.key(arch=c.architecture, layers=c.num_layers, hidden=c.hidden_size,
                            heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                            ffn=c.intermediate_size, vocab=c.vocab_size, dtype=str(model.profile.dtype),
                            compute=str(model.profile.compute_dtype), engine=ec.engine,
                            block=ec.block_size, threads=torch.get_num_threads(), device=ec.device,
                            backend=ec.attention_backend, torch=torch.__version__,
                            method=PROFILE_METHOD)


def profile_model(engine: MultiModelEngine, model_id: str) -> TimingProfile:
    """Measure the model on the engine (it must have no requests of this model in flight)."""
    if engine.has_unfinished(model_id):
        raise RuntimeError(f"cannot profile {model_id} while it has requests")
    engine.switch_to(model_id)
    limit = _fitting_tokens(engine, model_id)
    prefill = [(n, _time_prefill(engine, model_id, n)) for n in PREFILL_LENGTHS if n + 2 <= limit]
    decode = [sample for batch, length in DECODE_SHAPES if batch * (length + DECODE_TOKENS) <= limit
              for sample in _time_decode(engine, model_id, batch, length)]
    return TimingProfile(decode=StepTimeModel.fit(decode), prefill=PrefillTimeModel.fit(prefill),
                         weight_bytes=engine.models[model_id].profile.nbytes)


def measure_step_table(engine: MultiModelEngine, model_id: str) -> StepTable:
    """The model's decode steps by batch size (StepTable), for a simulated clock; not cached:
    instances schedule by the line of their profile, only `tokenpool profile --live-clock` asks."""
    if engine.has_unfinished(model_id):
        raise RuntimeError(f"cannot measure {model_id} while it has requests")
    engine.switch_to(model_id)
    book = engine.models[model_id].book
    kv_tokens = book.scheduler.blocks.num_blocks * book.scheduler.blocks.block_size

    def fits(batch: int, length: int) -> bool:
        per_sequence = length + DECODE_TOKENS
        return per_sequence <= book.max_model_len and batch * per_sequence <= kv_tokens

    batches = [b for b in TABLE_BATCHES if fits(b, TABLE_CONTEXT)]
    if len(batches) < 2 or not fits(TABLE_SLOPE_BATCH, max(TABLE_SLOPE_CONTEXTS)):
        raise RuntimeError(f"{model_id}: its KV region ({kv_tokens} tokens) or context "
                           f"({book.max_model_len}) is too small to measure a step table")
    rounds = []  # interleaved, so a slow spell of the machine spreads over every batch size
    for _ in range(TABLE_ROUNDS):
        seconds = [_time_decode(engine, model_id, b, TABLE_CONTEXT)[0][2] for b in batches]
        short, long = (_time_decode(engine, model_id, TABLE_SLOPE_BATCH, n)[0] for n in TABLE_SLOPE_CONTEXTS)
        rounds.append(seconds + [(long[2] - short[2]) / (long[0] - short[0])])
    *seconds, per_token = (statistics.median(column) for column in zip(*rounds, strict=True))
    return StepTable(TABLE_CONTEXT, tuple(batches), tuple(seconds), max(0.0, per_token))


def measure_kv_swap(engine: MultiModelEngine, model_id: str, pick=statistics.median) -> KVSwapTime:
    """One sequence's KV swapped out to the host pool and back in through the instance's own
    KVSwapper, timed from the request to the handle's completion (thread hand-off included, as
    a switch waits for it); the median of KV_SWAP_ROUNDS round trips (pick: another statistic)."""
    engine.switch_to(model_id)
    shape = engine.models[model_id].shape
    kv = engine.runner.kv_cache.kv
    room = min(KV_SWAP_BLOCKS, engine.runner.kv_cache.num_blocks, engine.pool.free_blocks(shape))
    if room < 1:
        raise MemoryError(f"no room to time a KV swap of {model_id}: the host KV pool has no free block")
    blocks = list(range(room))
    out_s, in_s = [], []
    for _ in range(KV_SWAP_ROUNDS):
        start = time.perf_counter()
        offsets = engine.swapper.swap_out(kv, blocks, shape).result()
        landed = time.perf_counter()
        engine.swapper.swap_in(kv, offsets, blocks, shape).wait()
        out_s.append(landed - start)
        in_s.append(time.perf_counter() - landed)
        engine.swapper.release(offsets)
    nbytes = len(blocks) * shape.nbytes
    return KVSwapTime(engine.config.engine.block_size, shape.nbytes,
                      nbytes / pick(out_s) / 1e9, nbytes / pick(in_s) / 1e9)


def measure_kv_swaps(engine: MultiModelEngine) -> dict[str, KVSwapTime]:
    """KV swap times for every registered model from one measurement (measure_kv_swap) on the
    active model, or the first registered: the swapper's rate is the instance's, a model only sets
    the bytes its blocks hold. One measurement, not one per model: a catalogue's models are loaded
    only when used."""
    probe = engine.active or next(iter(engine.models))
    try:
        # The fastest round: an instance starts beside others that are busy starting too, and a
        # rate measured slow makes every turn wait for swap-ins that landed long before.
        rates = measure_kv_swap(engine, probe, pick=min)
    except MemoryError as exc:  # a pool too small to time: plan as if KV moved in no time
        log.warning("KV swaps not timed (%s); decode turns plan no swap-in time", exc)
        return {}
    return {m: kv_swap_for(rates, engine, m) for m in engine.models}


def kv_swap_for(rates: KVSwapTime, engine: MultiModelEngine, model_id: str) -> KVSwapTime:
    """rates (one model's measured KVSwapTime) for model_id's blocks."""
    return msgspec.structs.replace(rates, block_bytes=engine.models[model_id].shape.nbytes)


def measure_prefetch_factor(engine: MultiModelEngine, copy_gbps: float) -> float:
    """Extra compute a prefetch costs its instance, per second the copy takes alone: decode steps
    of the largest model (PREFETCH_BATCH sequences) timed alone and while the second largest is
    copied into the free slot, with another process computing on one thread (the other instance,
    as under load). Needs three models (the free slot is refilled by prefetching the smallest);
    0.0 with fewer."""
    by_size = sorted(engine.models, key=lambda m: engine.models[m].profile.nbytes)
    if len(by_size) < 3:
        return 0.0
    small, target, large = by_size[0], by_size[-2], by_size[-1]
    seqs = _requests(engine, large, PREFETCH_BATCH, TABLE_CONTEXT, max_tokens=1 << 20)
    busy = subprocess.Popen([sys.executable, "-c", _BUSY_CORE], stdout=subprocess.PIPE, text=True)
    try:
        busy.stdout.readline()
        for _ in range(3):  # prefill, then the slow first decode step
            engine.step(large)
        alone, beside, copied = [], [], 0.0
        for _ in range(PREFETCH_ROUNDS):
            engine.prefetch(small).result()
            alone += [_timed_step(engine, large) for _ in range(2)]
            copying = engine.prefetch(target)
            while not copying.done():
                beside.append(_timed_step(engine, large))
            copying.result()
            copied += engine.models[target].profile.nbytes / (copy_gbps * 1e9)
    finally:
        busy.kill()
        busy.wait()
        _drop(engine, large, seqs)
    return max(0.0, (sum(beside) - len(beside) * statistics.median(alone)) / copied)


def _timed_step(engine: MultiModelEngine, model_id: str) -> float:
    start = time.perf_counter()
    engine.step(model_id)
    return time.perf_counter() - start


def measure_copy_gbps(device: str = "cpu", nbytes: int = COPY_PROBE_BYTES) -> float:
    """Host-to-arena copy bandwidth in GB/s (best of 3 after a copy that faults the pages in), for
    switch times = weight bytes / bandwidth."""
    # On CUDA the source is page-locked, as the host model cache is: the DMA rate.
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.device(device).type == "cuda").fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        if dst.is_cuda:
            torch.cuda.synchronize(dst.device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def _fitting_tokens(engine: MultiModelEngine, model_id: str) -> int:
    model = engine.models[model_id]
    blocks = model.book.scheduler.blocks
    return min(blocks.num_blocks * blocks.block_size, model.book.max_model_len)


def _requests(engine: MultiModelEngine, model_id: str, batch: int, length: int, max_tokens: int) -> list:
    vocab = engine.models[model_id].profile.config.vocab_size
    generator = torch.Generator().manual_seed(length * 131 + batch)
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [engine.add_request(model_id, torch.randint(0, vocab, (length,), generator=generator).tolist(),
                               sampling, request_id=f"profile-{model_id}-{batch}-{length}-{i}")
            for i in range(batch)]


def _time_prefill(engine: MultiModelEngine, model_id: str, length: int) -> float:
    seqs = _requests(engine, model_id, 1, length, max_tokens=1)
    start = time.perf_counter()
    while engine.has_unfinished(model_id):
        engine.step(model_id)
    seconds = time.perf_counter() - start
    _drop(engine, model_id, seqs)
    return seconds


def _time_decode(engine: MultiModelEngine, model_id: str, batch: int, length: int) -> list:
    seqs = _requests(engine, model_id, batch, length, max_tokens=DECODE_TOKENS)
    while any(s.num_output_tokens == 0 for s in seqs):  # prefill every prompt first
        engine.step(model_id)
    engine.step(model_id)
    times = []
    for _ in range(DECODE_STEPS):
        sum_len = sum(s.num_tokens for s in seqs)
        start = time.perf_counter()
        engine.step(model_id)
        times.append((sum_len, batch, time.perf_counter() - start))
    _drop(engine, model_id, seqs)
    median = statistics.median(t for _, _, t in times)
    return [(sum_len, b, median) for sum_len, b, _ in times]


def _drop(engine: MultiModelEngine, model_id: str, seqs: list) -> None:
    for seq in seqs:
        if not seq.is_finished:
            engine.abort(model_id, seq.request_id)


PROFILE_FILE_KIND = "tokenpool-instance-profile"


class _ProfileFile(msgspec.Struct):
    kind: str
    copy_gbps: float
    models: dict[str, TimingProfile]
    serving: ServingOverhead | None = None
    step_tables: dict[str, StepTable] = {}
    kv_swap: dict[str, KVSwapTime] = {}


class InstanceTimings:
    """Every registered model's profile on this instance, and the copy bandwidth: the predictions
    schedulers and dispatch use (step, prefill and switch seconds). What a profile file adds
    for a simulated clock only: `serving` (ServingOverhead; zero unless measured),
    `step_tables` (StepTable per model; clock_step_seconds falls back to the line) and
    `kv_swap` (KVSwapTime per model; KV moves in no time without one)."""

    def __init__(self, profiles: dict[str, TimingProfile], copy_gbps: float,
                 serving: ServingOverhead | None = None,
                 step_tables: dict[str, StepTable] | None = None,
                 kv_swap: dict[str, KVSwapTime] | None = None) -> None:
        if not copy_gbps > 0:
            raise ValueError(f"copy bandwidth must be positive, got {copy_gbps!r}")
        self.profiles = profiles
        self.copy_gbps = copy_gbps
        self.serving = serving or ServingOverhead()
        self.step_tables = step_tables or {}
        self.kv_swap = kv_swap or {}
        for what, table in (("step tables", self.step_tables), ("KV swap times", self.kv_swap)):
            unknown = sorted(set(table) - set(profiles))
            if unknown:
                raise ValueError(f"{what} for models without a profile: {', '.join(unknown)}")

    @classmethod
    def measure(cls, engine: MultiModelEngine, cache: ProfileCache | None = None) -> InstanceTimings:
        """Profiles from the cache or measured now, for every model the engine has registered."""
        profiles = {m: cached_profile(engine, m, cache) for m in engine.models}
        return cls(profiles, measure_copy_gbps(engine.config.engine.device))

    def to_json(self, **meta: object) -> bytes:
        """This instance's timings as a profile file (`tokenpool profile`; the simulator reads it)."""
        file = {"kind": PROFILE_FILE_KIND, **meta, "copy_gbps": self.copy_gbps, "models": self.profiles}
        if self.serving != ServingOverhead():
            file["serving"] = self.serving
        if self.step_tables:
            file["step_tables"] = self.step_tables
        if self.kv_swap:
            file["kv_swap"] = self.kv_swap
        return msgspec.json.format(msgspec.json.encode(file), indent=1)

    @classmethod
    def from_json(cls, data: bytes | str, source: str = "profile") -> InstanceTimings:
        """Read a profile file; ValueError naming `source` and the problem."""
        try:
            file = msgspec.json.decode(data, type=_ProfileFile)
        except (msgspec.DecodeError, ValueError) as exc:  # ValueError: a negative serving overhead
            raise ValueError(f"{source}: not a tokenpool profile ({exc})") from None
        if file.kind != PROFILE_FILE_KIND:
            raise ValueError(f"{source}: kind {file.kind!r}, expected {PROFILE_FILE_KIND!r}")
        if not file.models:
            raise ValueError(f"{source}: no models")
        try:
            return cls(file.models, file.copy_gbps, file.serving, file.step_tables, file.kv_swap)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def step_seconds(self, batch) -> float:
        """Predicted decode step of a BatchInfo."""
        return self.profiles[batch.model].decode.predict(batch.sum_seq_len, batch.num_seqs)

    def kv_swap_seconds(self, model: str, seq_len: int, direction: str) -> float:
        """A simulated clock's swap of one sequence's KV, 'out' or 'in' (0 when not measured)."""
        times = self.kv_swap.get(model)
        return times.seconds(seq_len, direction) if times is not None else 0.0

    def clock_step_seconds(self, model: str, sum_seq_len: int, batch_size: int) -> float:
        """A simulated clock's decode step: the measured table if there is one, else the line."""
        table = self.step_tables.get(model)
        if table is not None:
            return table.predict(sum_seq_len, batch_size)
        return self.profiles[model].decode.predict(sum_seq_len, batch_size)

    def prefill_seconds(self, model: str, num_tokens: int) -> float:
        return self.profiles[model].prefill.predict(num_tokens)

    def switch_seconds(self, model: str) -> float:
        return self.profiles[model].weight_bytes / (self.copy_gbps * 1e9)
