"""MultiModelEngine: one instance, any registered model, switching between them.

The instance initialises once: a device arena (| KV | slot A | slot B |), a
ModelSwitcher over the node's host model cache, and a KVSwapper over the node's
host KV pool. Each model keeps its own RequestBook (queue, sequences, progress);
a switch swaps the outgoing model's KV out to the pool, binds the incoming
model's weights (prefetched if it was predicted) and swaps its KV back in. A
step runs the sequences whose KV has landed and waits only when none has.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .block_manager import BlockManager
from .cold_loader import ROOM_WAIT_S, LoadTicket
from .device_arena import DeviceArena
from .host_kv_pool import HostKVPool
from .host_model_cache import HostModelCache, TensorSpec
from .kv_cache import PagedKVCache
from .kv_swapper import KVSwapper, SwapHandle
from .llm_engine import EngineConfig, resolve_dtypes
from .model_backend import ModelBackend, kv_layout_for, slot_weight_dtype
from .model_config import ModelConfig
from .model_switcher import (
    ModelProfile,
    ModelSwitcher,
    cache_metadata,
    model_profile,
    model_specs,
    register_model,
    slot_bytes_needed,
    stale_entry,
)
from .model_tiers import ModelTiers
from .request_book import RequestBook, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .slab_allocator import BlockShape, KVPoolFullError
from .turn_policy import BatchInfo

log = logging.getLogger(__name__)

# sink(layer, first_block, kv_layer, block_ids): layer `layer` of the sequence's blocks first_block,
# first_block + 1, ... is computed; they are kv_layer[:, b] for b in block_ids, where kv_layer is
# [2, num_device_blocks, block_size, kv_heads, head_dim] and stays valid until the sequence ends.
KVSink = Callable[[int, int, torch.Tensor, list[int]], None]


def slot_dtypes(engine: EngineConfig, config: ModelConfig) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """-> (checkpoint dtype, dtype a switching instance holds the model's matrices in, dtype it
    computes in). Held = computed, except bf16 models computed in float32 on a CPU, held bf16
    (model_backend.slot_weight_dtype) unless engine.linear_kernel is 'dense': float32 copies
    and F.linear, what `bench engine --against instance-dense` measures."""
    weights, compute = resolve_dtypes(engine, config)
    if engine.linear_kernel == "dense":
        return weights, compute, compute
    return weights, slot_weight_dtype(engine.engine, engine.device, weights, compute), compute


def instance_specs(engine: EngineConfig, config: ModelConfig) -> tuple[TensorSpec, ...]:
    """The tensors a switching instance caches and copies into a slot for this model."""
    _, held, compute = slot_dtypes(engine, config)
    return model_specs(config, held, compute)


def slot_bytes_for(folders: Iterable[Path], engine: EngineConfig) -> int:
    """The arena slot the largest of these models needs, held as `engine` holds it."""
    return max(slot_bytes_needed(instance_specs(engine, ModelConfig.from_folder(f))) for f in folders)


@dataclass(frozen=True)
class InstanceConfig:
    """Memory of one switching instance.

    kv_bytes: the arena's KV region (blocks of whichever model is active).
    slot_bytes: each of the two model slots; the largest registered model must fit.
    engine: dtype, block size, scheduler limits and context as for a single-model engine
      (its kv_cache_bytes is not used; weights live in the arena as bytes copied from the host
      cache, applied as they lie, since packed layouts cannot be copied: see slot_dtypes for
      what linear_kernel still chooses).
    load_wait_s: how long a catalogue model's disk load waits for host-cache room held by
      models in use or with work before its requests fail (cold_loader.py).
    """

    kv_bytes: int = 256 << 20
    slot_bytes: int = 1 << 30
    engine: EngineConfig = field(default_factory=EngineConfig)
    load_wait_s: float = ROOM_WAIT_S

    def __post_init__(self) -> None:
        if self.kv_bytes < 1 or self.slot_bytes < 1:
            raise ValueError(f"kv_bytes and slot_bytes must be positive, got {self.kv_bytes}, "
                             f"{self.slot_bytes}")
        if not self.load_wait_s >= 0:
            raise ValueError(f"load_wait_s must be >= 0, got {self.load_wait_s}")


class SwitchRecord(NamedTuple):  # a tuple: built on every switch, where a frozen dataclass costs µs
    """One model switch, as switch_to() measured it (for logs, metrics and traces)."""

    outgoing: str | None
    incoming: str
    weight_bytes: int
    prefetched: bool  # the incoming weights were already (being) copied into the free slot
    kv_out: int  # sequences of the outgoing model whose KV was swapped out to the host pool
    kv_in: int  # sequences of the incoming model whose KV swap-in started
    started_ns: int  # wall clock (time.time_ns) when the switch began
    seconds: float


@dataclass
class _Model:
    profile: ModelProfile
    book: RequestBook
    shape: BlockShape
    swapped: dict[str, SwapHandle] = field(default_factory=dict)  # request_id -> swap-out
    landing: dict[str, tuple[SwapHandle, list[int]]] = field(default_factory=dict)  # swap-ins
    switched_in: list[SwapHandle] = field(default_factory=list)  # the last switch to it swapped in
    arriving: deque[Sequence] = field(default_factory=deque)  # adopted, KV staged in the pool
    kv: PagedKVCache | None = None  # the KV region in this model's shape
    kv_sinks: dict[str, KVSink] = field(default_factory=dict)  # request_id -> where its KV streams


class MultiModelEngine:
    def __init__(self, config: InstanceConfig, cache: HostModelCache, pool: HostKVPool) -> None:
        self.config = config
        ec = config.engine
        if ec.num_threads:
            torch.set_num_threads(ec.num_threads)
        self.cache = cache
        cache.replaces = stale_entry  # an older tokenpool's entries, another checkpoint's: read again
        self.arena = DeviceArena(config.kv_bytes, config.slot_bytes, ec.device)
        self.max_positions = ec.max_model_len or 1 << 15
        self.switcher = ModelSwitcher(cache, self.arena, self.max_positions, ec.engine, ec.block_size,
                                      ec.attention_backend)
        self.kv_layout = kv_layout_for(ec.engine, ec.device)  # what the engine's attention reads
        self.pool = pool
        self.swapper = KVSwapper(pool)
        self.models: dict[str, _Model] = {}
        self.active: str | None = None
        self.runner: ModelBackend | None = None  # the active model's backend
        self.switches = 0
        self.last_switch: SwitchRecord | None = None
        self.tiers: ModelTiers | None = None  # made by the first registration
        self._loading: dict[str, LoadTicket] = {}  # weights_ready(): disk loads it started
        self._failed_loads: dict[str, BaseException] = {}  # seen by weights_ready(), raised by switch_to
        # Requests an instance queues before they reach the engine (a prefill instance's grouped-FCFS
        # queue): model_id -> whether any wait. Called from any thread.
        self.queued_before: Callable[[str], bool] = lambda model_id: False

    # -- registration and requests --------------------------------------------

    def register(self, model_id: str, folder: Path, lazy: bool = False) -> ModelProfile:
        """Read a model into the host cache (once per node) and prepare its bookkeeping; lazy:
        read only its config and tokenizer now, its weights when first needed (model_tiers.py)."""
        if model_id in self.models:
            return self.models[model_id].profile
        ec = self.config.engine
        weight_dtype, held, compute = slot_dtypes(ec, ModelConfig.from_folder(folder))
        round_to = weight_dtype if weight_dtype != compute else None  # vectors too, held in compute
        if lazy:  # checked now; the tiers track it only once every check passed
            profile = model_profile(model_id, Path(folder), held, self.config.slot_bytes, compute)
            self.cache.forget_stale(model_id, profile.specs, cache_metadata(profile))
        else:
            profile = register_model(self.cache, model_id, Path(folder), held, round_to,
                                     max_bytes=self.config.slot_bytes, compute=compute)
        fill = ModelTiers.check(profile, round_to)  # read now or not, it can come back from disk
        config = profile.config
        max_len = min(ec.max_model_len or 1 << 62, config.max_position_embeddings, self.max_positions)
        num_blocks = self.config.kv_bytes // PagedKVCache.bytes_per_block(config, ec.block_size, compute)
        if num_blocks < 1:
            raise MemoryError(f"the arena's KV region ({self.config.kv_bytes} bytes) cannot hold "
                              f"one KV block of {model_id}")
        book = RequestBook(config, profile.tokenizer, max_len,
                           Scheduler(ec.scheduler, BlockManager(num_blocks, ec.block_size)))
        shape = BlockShape.of(config, ec.block_size, compute)
        self.switcher.prepare(profile)  # backends for this shape, built here, not on the copier thread
        self.models[model_id] = _Model(profile, book, shape)
        self.model_tiers().add(profile, fill)  # evicted later (admin, or room for a load): read again
        if lazy:
            self.switcher.release_idle_leases = True  # catalogue models must stay evictable
        log.info("registered %s: %s weights held in %s, computing in %s (compute_dtype %s), %d KV "
                 "blocks, engine %s", model_id, *(str(d).removeprefix("torch.") for d in (
                     weight_dtype, held, compute)), ec.compute_dtype, num_blocks, ec.engine)
        return profile

    def model_tiers(self) -> ModelTiers:
        if self.tiers is None:
            self.tiers = ModelTiers(self.cache, lambda m: m in self.models and self.wants(m),
                                    room_wait_s=self.config.load_wait_s)
        return self.tiers

    def unregister(self, model_id: str) -> None:
        """Forget a model with no unfinished requests (ValueError names them otherwise); its
        host-cache copy stays until evicted."""
        model = self._model(model_id)
        if self.has_unfinished(model_id):
            raise ValueError(f"model {model_id!r} has {model.book.num_unfinished} unfinished requests; "
                             f"drain or abort them first")
        if model_id == self.active or self.switcher.is_prefetched(model_id):
            raise ValueError(f"model {model_id!r} is in an arena slot; switch to another model first")
        del self.models[model_id]
        self._drop_load(model_id)
        self._failed_loads.pop(model_id, None)
        if self.tiers is not None:
            self.tiers.remove(model_id)

    def add_request(self, model_id: str, prompt: str | list[int], sampling: SamplingParams | None = None,
                    chat: bool = False, request_id: str | None = None) -> Sequence:
        seq = self._model(model_id).book.add_request(prompt, sampling, request_id, chat=chat)
        self.note_arrival(model_id)
        return seq

    def note_arrival(self, model_id: str) -> None:
        """A request for model_id arrived (here, or in a queue before the engine): its host-cache
        copy is wanted now, the costliest to evict (cache_eviction.py)."""
        if self.tiers is not None and model_id in self.tiers:
            self.tiers.activity.seen(model_id)

    def adopt(self, model_id: str, request_id: str, prompt_ids: list[int], first_token: int,
              sampling: SamplingParams, seed: int, blocks: list[torch.Tensor]) -> Sequence:
        """Take over a sequence prefilled elsewhere, with its prompt's KV in `blocks`.

        blocks: ceil(len(prompt_ids) / block_size) tensors of the model's BlockShape dims, e.g.
        views of a hand-off pool. They are copied into this instance's host KV pool before this
        returns (so the caller may release them); the sequence joins its model's batch at a
        later step, once the model is active and the device has room. KVPoolFullError or
        InvalidRequestError with nothing changed.
        """
        model = self._model(model_id)
        need = -(-len(prompt_ids) // self.config.engine.block_size)
        if len(blocks) != need:
            raise ValueError(f"{len(prompt_ids)} prompt tokens need {need} KV blocks, got {len(blocks)}")
        seq = model.book.adopt(prompt_ids, first_token, sampling, seed, request_id)
        try:
            staged = self.swapper.stage(blocks, model.shape)
            staged.wait()
        except BaseException:
            model.book.abort(request_id)
            raise
        model.swapped[request_id] = staged
        model.arriving.append(seq)
        return seq

    def handoff_blocks(self, model_id: str, request_id: str) -> tuple[BlockShape, list[torch.Tensor]]:
        """Views of the device blocks holding a sequence's computed KV (prompt after prefill).

        Valid until the next step or switch: copy them out (a KV transport publishes them),
        then abort() the sequence to free its blocks.
        """
        model = self._model(model_id)
        seq = model.book.get(request_id)
        if model_id != self.active or seq is None or seq.request_id in model.landing:
            raise ValueError(f"{request_id} has no KV on the device for {model_id}")
        n = -(-seq.num_computed_tokens // self.config.engine.block_size)
        return model.shape, [self.runner.kv_cache.kv.select(2, b) for b in seq.block_table[:n]]

    def stream_kv(self, model_id: str, request_id: str, sink: KVSink) -> None:
        """Hand request_id's KV to sink layer by layer as its steps compute it (a prefill that
        streams its KV out while later layers compute), until stop_stream or abort."""
        self._model(model_id).kv_sinks[request_id] = sink

    def stop_stream(self, model_id: str, request_id: str) -> None:
        self._model(model_id).kv_sinks.pop(request_id, None)

    def abort(self, model_id: str, request_id: str) -> None:
        """Stop a request and free its KV wherever it is: device blocks or the host pool."""
        model = self._model(model_id)
        model.kv_sinks.pop(request_id, None)
        model.arriving = deque(s for s in model.arriving if s.request_id != request_id)
        swapped = model.swapped.pop(request_id, None)
        if swapped is not None:
            self.swapper.release(swapped.result())
        landing = model.landing.pop(request_id, None)
        if landing is not None:
            landing[0].wait()
            self.swapper.release(landing[1])
        model.book.abort(request_id)
        if not self.wants(model_id):
            self._drop_load(model_id)  # nobody here waits for its weights any more
            if self.tiers is not None and model_id in self.tiers:
                self.tiers.activity.unexpect(model_id)  # nor keeps it in the host cache

    def has_unfinished(self, model_id: str | None = None) -> bool:
        ids = [model_id] if model_id else list(self.models)
        return any(self._model(m).book.has_unfinished or self._model(m).arriving for m in ids)

    def wants(self, model_id: str) -> bool:
        """Whether a request here needs model_id's weights: unfinished in the engine, or queued
        before it (queued_before). Such a model is no eviction victim, and its load goes on."""
        return self.has_unfinished(model_id) or self.queued_before(model_id)

    def batch_info(self, model_id: str) -> BatchInfo:
        """The model's unfinished sequences, as a scheduler sizes its step time."""
        model = self._model(model_id)
        seqs = [*model.book.scheduler.running, *model.book.scheduler.waiting, *model.arriving]
        return BatchInfo(model_id, len(seqs), sum(seq.num_tokens for seq in seqs))

    def num_requests(self, model_id: str) -> int:
        """Unfinished requests of a model: queued, running, swapped out or arriving."""
        return self._model(model_id).book.num_unfinished

    def kv_landed_at(self, model_id: str) -> float | None:
        """When the KV that the last switch to model_id swapped in had all landed (time.monotonic());
        None while some of it is still on its way; -inf when that switch swapped none in."""
        handles = self._model(model_id).switched_in
        if not all(h.done() for h in handles):
            return None
        return max((h.finished_at or time.monotonic() for h in handles), default=-math.inf)

    @property
    def kv_blocks_used(self) -> int:
        """Device KV blocks held by the active model's sequences."""
        if self.active is None:
            return 0
        blocks = self.models[self.active].book.scheduler.blocks
        return blocks.num_blocks - blocks.num_free_blocks

    def _model(self, model_id: str) -> _Model:
        if model_id not in self.models:
            raise KeyError(f"model {model_id!r} is not registered; registered: {sorted(self.models)}")
        return self.models[model_id]

    # -- switching --------------------------------------------------------------

    def prefetch(self, model_id: str) -> Future | None:
        """Start copying model_id into the free arena slot; the future completes when it is
        ready to activate. None when it is already the active model."""
        if model_id == self.active:
            return None
        if self.tiers is not None and model_id in self.tiers and not self.tiers.pin(model_id):
            self._start_load(model_id)  # from disk in the background; the slot copy waits for the switch
            return None
        return self.switcher.prefetch(self._model(model_id).profile)

    def weights_ready(self, model_id: str) -> bool:
        """Whether switch_to(model_id) would find its weights without reading the disk: active,
        prefetched, not a catalogue model, or in the host cache. Else its load from disk starts in
        the background (once) and this is False until the load has ended, so a scheduler can serve
        models in memory meanwhile instead of holding the engine thread for the read. A load that
        failed -> True: the switch then reports its error to the model's requests (read_disk=False)
        or reads again."""
        if self.weights_in_memory(model_id):
            self._drop_load(model_id)  # a load of ours that ended (or another process's did it)
            return True
        ticket = self._start_load(model_id)
        if ticket is not None and not ticket.done():
            return False
        if ticket is not None and ticket.error() is not None:
            self._failed_loads[model_id] = ticket.error()
        self._drop_load(model_id)
        return True

    def weights_in_memory(self, model_id: str) -> bool:
        """weights_ready() without its side effects: whether the weights are in memory now (no
        load is started). In the host cache means published there, whoever read it: a load of
        ours not yet noticed as ended, or another process's (it was not: the model's queued work
        then waited behind a load that waited for the room it held)."""
        return (self.tiers is None or model_id not in self.tiers or model_id == self.active
                or self.switcher.is_prefetched(model_id) or self.cache.contains(model_id))

    def _start_load(self, model_id: str) -> LoadTicket | None:
        """This engine's one claim on model_id's disk load (started unless running; None: cached).
        The claim goes when the model is ready or has no requests left (abort), so a load every
        waiter gave up on is abandoned (cold_loader.py)."""
        ticket = self._loading.get(model_id)
        if ticket is None:
            self.tiers.activity.expect(model_id)  # not a victim while it loads
            ticket = self.tiers.fetch(model_id)
            if ticket is not None:
                self._loading[model_id] = ticket
        return ticket

    def _drop_load(self, model_id: str) -> None:
        ticket = self._loading.pop(model_id, None)
        if ticket is not None:
            ticket.cancel()  # this claim only: a load others still wait for goes on

    def switch_to(self, model_id: str, read_disk: bool = True) -> bool:
        """Make model_id the active model; its sequences keep their progress. A catalogue model
        whose weights are only on disk is read first, on the loader's thread while this one waits;
        with read_disk=False this one does not wait: the load starts in the background and the
        call returns False with nothing moved (the model left the host cache after weights_ready()
        said it was there: another process evicted it). True once model_id is active."""
        if model_id == self.active:
            return True
        incoming = self._model(model_id)
        start, started_ns, outgoing = time.perf_counter(), time.time_ns(), self.active
        prefetched = self.switcher.is_prefetched(model_id)
        failed_load = self._failed_loads.pop(model_id, None)
        if self.tiers is not None and model_id in self.tiers and not prefetched:
            if read_disk:
                self.tiers.ensure_cached(model_id)  # before anything moves: a failed read changes nothing
            elif not self.tiers.pin(model_id):
                if failed_load is not None:
                    raise failed_load
                self._start_load(model_id)
                return False
        pending_out = self._swap_out_active()
        try:
            model = self.switcher.activate(incoming.profile)
        except BaseException:
            if outgoing is not None:  # the active model runs on: its sequences' KV goes back in
                self._swap_in(self.models[outgoing])
            raise
        self._drop_load(model_id)  # a claim a prefetch or weights_ready left: the weights are in
        if self.tiers is not None:
            self.tiers.activity.settled(model_id)
        for handle in pending_out:  # the KV region is about to take the new shape
            handle.wait()
        model.bind_kv(self._kv_view(incoming))  # backends live as long as the switcher
        self.runner = model
        self.active = model_id
        self.switches += 1
        kv_in = self._swap_in(incoming)
        self.last_switch = SwitchRecord(outgoing, model_id, incoming.profile.nbytes, prefetched,
                                        len(pending_out), kv_in, started_ns, time.perf_counter() - start)
        if log.isEnabledFor(logging.INFO):
            log.info("switch %s -> %s: %d weight bytes%s, %d sequences' KV out, %.2f ms", outgoing, model_id,
                     incoming.profile.nbytes, " (prefetched)" if prefetched else "", len(pending_out),
                     self.last_switch.seconds * 1e3)
        return True

    def _kv_view(self, model: _Model) -> PagedKVCache:
        """The arena's KV region seen in model's block shape (built once per model)."""
        if model.kv is None:
            model.kv = PagedKVCache(model.profile.config, model.book.scheduler.blocks.num_blocks,
                                    self.config.engine.block_size, model.profile.compute_dtype,
                                    storage=self.arena.buffer[:self.config.kv_bytes], layout=self.kv_layout)
        return model.kv

    def _swap_out_active(self) -> list[SwapHandle]:
        if self.active is None:
            return []
        outgoing = self.models[self.active]
        self._wait_landing(outgoing)  # a block still being swapped in cannot be swapped out
        need = sum(len(seq.block_table) for seq in outgoing.book.scheduler.running)
        free = self.pool.free_blocks(outgoing.shape) if need else 0
        if need > free:  # refuse before anything moves: the active model keeps running
            raise KVPoolFullError(f"switching away from {self.active} needs {need} host KV blocks "
                                  f"of {outgoing.shape.nbytes} bytes, {free} free; enlarge the host KV pool")
        handles = []
        for seq in outgoing.book.scheduler.running:
            if seq.block_table:
                handle = self.swapper.swap_out(self.runner.kv_cache.kv, seq.block_table, outgoing.shape)
                outgoing.swapped[seq.request_id] = handle
                outgoing.book.scheduler.blocks.release(seq)
                handles.append(handle)
        return handles

    def _swap_in(self, model: _Model) -> int:
        """Start swapping in the running sequences' KV -> how many."""
        seqs = [seq for seq in model.book.scheduler.running if seq.request_id in model.swapped]
        model.switched_in = [self._start_swap_in(model, seq) for seq in seqs]
        return len(seqs)

    def _start_swap_in(self, model: _Model, seq: Sequence) -> SwapHandle:
        offsets = model.swapped.pop(seq.request_id).result()
        blocks = model.book.scheduler.blocks
        blocks.grow(seq, len(offsets) * blocks.block_size)
        landing = self.swapper.swap_in(self.runner.kv_cache.kv, offsets, seq.block_table, model.shape)
        model.landing[seq.request_id] = (landing, offsets)
        return landing

    def _admit_arrivals(self, model: _Model) -> None:
        """Move adopted sequences into the batch while it has room, swapping their KV in."""
        scheduler = model.book.scheduler
        while model.arriving and scheduler.has_room:
            seq = model.arriving[0]
            if not scheduler.blocks.can_grow(seq, seq.num_computed_tokens):
                if not scheduler.running:
                    raise MemoryError(f"the KV region cannot hold the prompt of {seq.request_id} "
                                      f"({seq.num_prompt_tokens} tokens)")
                return
            model.arriving.popleft()
            scheduler.adopt(seq)
            self._start_swap_in(model, seq)

    def _landed(self, model: _Model, seq: Sequence) -> bool:
        entry = model.landing.get(seq.request_id)
        if entry is None:
            return True
        if not entry[0].done():
            return False
        entry[0].wait()
        self.swapper.release(entry[1])
        del model.landing[seq.request_id]
        return True

    # -- stepping ----------------------------------------------------------------

    def step(self, model_id: str) -> list[RequestOutput]:
        """Switch to model_id if needed, then run one step of its sequences."""
        self.switch_to(model_id)
        model = self.models[model_id]
        self._admit_arrivals(model)
        if model.book.scheduler.blocks.num_free_blocks < len(model.book.scheduler.running):
            self._wait_landing(model)  # a preemption must not free blocks still being written
        plan = model.book.scheduler.schedule(lambda s: self._landed(model, s))
        if not plan.chunks and model.landing:  # nothing has landed yet: wait for the first
            next(iter(model.landing.values()))[0].wait()
            plan = model.book.scheduler.schedule(lambda s: self._landed(model, s))
        if not plan.chunks:
            if model.book.has_unfinished and not model.landing:
                raise MemoryError(f"the KV region cannot hold even one waiting sequence of {model_id}")
            return []
        outputs = model.book.apply(plan, self.runner.execute(plan, self._layer_hook(model, plan)))
        self._forget_finished(model)
        return outputs

    def _layer_hook(self, model: _Model, plan) -> Callable[[int], None] | None:
        """The forward pass's per-layer callback feeding the plan's streamed sequences; None (no
        cost) when none of them streams."""
        if not model.kv_sinks:
            return None
        bs = self.config.engine.block_size
        targets = []
        for chunk in plan.chunks:
            sink = model.kv_sinks.get(chunk.seq.request_id)
            if sink is not None:  # the blocks this chunk's tokens land in
                start = chunk.seq.num_computed_tokens
                first, end = start // bs, -(-(start + chunk.num_tokens) // bs)
                targets.append((sink, first, list(chunk.seq.block_table[first:end])))
        if not targets:
            return None
        kv = self.runner.kv_cache.kv  # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]

        def on_layer(i: int) -> None:
            for sink, first, block_ids in targets:
                sink(i, first, kv[i], block_ids)
        return on_layer

    def _wait_landing(self, model: _Model) -> None:
        if not model.landing:
            return
        for seq in list(model.book.scheduler.running):
            if seq.request_id in model.landing:
                model.landing[seq.request_id][0].wait()
                self._landed(model, seq)

    def _forget_finished(self, model: _Model) -> None:
        live = {s.request_id for s in model.book.scheduler.running}
        for request_id in [r for r in model.landing if r not in live]:
            handle, offsets = model.landing.pop(request_id)
            handle.wait()
            self.swapper.release(offsets)

    def close(self) -> None:
        for model_id in list(self._loading):
            self._drop_load(model_id)
        if self.tiers is not None:
            self.tiers.close()
        self.switcher.close()
        self.swapper.close()
