"""ModelSwitcher: moves registered models between the host model cache and the
device arena's two model slots, and re-binds reusable modules to them.

Component reuse: one model backend (model_backend.py) per distinct config and slot, built
once; filling a slot points that backend's parameters at the slot's weights, so
activating a filled slot is a pointer swap. Tokenizers and configs are read once
per model. The copy is one pass over the cached bytes: on the CPU in chunks, so a
prefetch running beside compute yields often; on CUDA one DMA from the page-locked
cache on a dedicated copy stream (or through two pinned staging buffers when the
cache could not be page-locked), ordered after the compute that last read the slot.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from .device_arena import BumpRegion, DeviceArena
from .host_model_cache import ALIGN, CachedModel, HostModelCache, ModelConflictError, TensorSpec
from .model import CausalLM
from .model_backend import BackendSpec, ModelBackend, make_model_backend
from .model_config import ModelConfig
from .tokenizer import Tokenizer
from .weights import Checkpoint, WeightLayout, checkpoint_source

log = logging.getLogger(__name__)

_CHUNK_BYTES = 8 << 20
_STAGING_BYTES = 32 << 20  # each of the two pinned staging buffers of an unpinned CUDA copy


@dataclass(frozen=True)
class ModelProfile:
    """What an instance keeps about a registered model between switches."""

    model_id: str
    folder: Path
    config: ModelConfig
    tokenizer: Tokenizer
    dtype: torch.dtype  # the dtype the weight matrices are held in (host cache, arena slot)
    specs: tuple[TensorSpec, ...]
    slot_bytes: int  # arena slot bytes the model takes (its page-aligned cached segment)
    compute_dtype: torch.dtype  # the dtype the model computes in (and its vectors are held in)
    source: str = ""  # weights.checkpoint_source of the folder when registered

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


@dataclass
class SlotContents:
    model_id: str
    model: ModelBackend | None  # this slot's backend, bound to the slot's weights once filled
    ready: Future
    after: object = None  # CUDA: an event on the compute stream; the copy waits for it


def model_specs(config: ModelConfig, dtype: torch.dtype,
                compute: torch.dtype | None = None) -> tuple[TensorSpec, ...]:
    """The tensors a model keeps in the host cache: its CausalLM parameters, fused; matrices
    (projections, embedding) in dtype, vectors (norms, biases) in compute (default dtype)."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in CausalLM(config, dtype, 1).named_parameters()}
    vectors = compute or dtype
    return tuple(TensorSpec(name, dtype if len(shapes[name]) > 1 else vectors, shapes[name])
                 for name in WeightLayout(config).sources)


def slot_bytes_needed(specs: tuple[TensorSpec, ...]) -> int:
    """Arena slot bytes a model takes: its cached segment (page-aligned tensors) plus alignment."""
    return sum(-(-s.nbytes // ALIGN) * ALIGN for s in specs) + BumpRegion.alignment


def register_model(cache: HostModelCache, model_id: str, folder: Path, dtype: torch.dtype,
                   round_to: torch.dtype | None = None, max_bytes: int | None = None,
                   compute: torch.dtype | None = None) -> ModelProfile:
    """Read a model folder once into the host cache in the engine's fused layout (matrices in
    dtype, the rest in compute: see model_specs).

    Raises (leaving the cache untouched) on a bad checkpoint, or when the weights
    exceed max_bytes (an arena model slot)."""
    profile = model_profile(model_id, folder, dtype, max_bytes, compute)
    cache.register(model_id, profile.specs, checkpoint_filler(profile, round_to),
                   metadata=cache_metadata(profile))
    return profile


def model_profile(model_id: str, folder: Path, dtype: torch.dtype, max_bytes: int | None = None,
                  compute: torch.dtype | None = None) -> ModelProfile:
    """A model's profile from its folder's config and tokenizer, without reading its weights;
    MemoryError when they exceed max_bytes (an arena model slot)."""
    config = ModelConfig.from_folder(folder)
    tokenizer = Tokenizer.from_folder(folder)
    specs = model_specs(config, dtype, compute)
    padded = slot_bytes_needed(specs)
    if max_bytes is not None and padded > max_bytes:
        raise MemoryError(f"model {model_id} needs {padded} bytes of weights with alignment; "
                          f"an arena model slot holds {max_bytes}")
    return ModelProfile(model_id, Path(folder), config, tokenizer, dtype, specs, padded, compute or dtype,
                        checkpoint_source(folder))


def checkpoint_filler(profile: ModelProfile,
                      round_to: torch.dtype | None = None) -> Callable[[str, torch.Tensor], None]:
    """fill(name, dest) for HostModelCache.register, over the folder's memory-mapped safetensors
    (one copy: page cache -> segment); a bad checkpoint raises here, before the cache is touched."""
    layout = WeightLayout(profile.config)
    checkpoint = Checkpoint(profile.folder)
    checkpoint.check(layout)
    return lambda name, dest: checkpoint.fill(layout, name, dest, round_to)


# The host-cache layout this code writes: bump it when the tensors a model caches change for the
# same settings (as bf16 slots did: float32 copies before), so a newer tokenpool replaces the
# entries an older one left in /dev/shm instead of refusing them.
LAYOUT_VERSION = "2"


def cache_metadata(profile: ModelProfile) -> dict[str, str]:
    return {"folder": str(profile.folder), "dtype": str(profile.dtype),
            "compute_dtype": str(profile.compute_dtype), "layout": LAYOUT_VERSION, "source": profile.source}


def stale_entry(cached: dict[str, str], registering: dict[str, str]) -> bool:
    """Whether a cached entry (its metadata) is stale for a registration (HostModelCache.replaces):
    written in another tokenpool's layout, or read from another checkpoint than the one being
    registered under its id (the id pointed at another folder, or the files rewritten since: the
    cache outlives the processes, so a restart must not serve the old weights)."""
    if cached.get("layout") != LAYOUT_VERSION:
        return True
    return "source" in registering and cached.get("source") != registering["source"]


def check_layout(profile: ModelProfile, cached: CachedModel) -> None:
    """ModelConflictError unless the cached tensors are exactly the ones profile expects, read from
    its checkpoint (another process may have registered the id in another layout, or from another
    folder, since this one did)."""
    want = [(s.name, s.dtype, s.shape) for s in profile.specs]
    have = [(name, dtype, shape) for name, (dtype, shape, _) in cached.layout.items()]
    if want != have:
        raise ModelConflictError(f"model {profile.model_id!r} in the host cache is in another layout "
                                 f"({cached.metadata.get('dtype', '?')} weights, layout "
                                 f"{cached.metadata.get('layout', 'of an older tokenpool')}) than this "
                                 f"instance computes with ({profile.dtype}, layout {LAYOUT_VERSION})")
    if profile.source and cached.metadata.get("source") != profile.source:
        raise ModelConflictError(f"model {profile.model_id!r} in the host cache was read from another "
                                 f"checkpoint ({cached.metadata.get('folder', '?')}) than this instance "
                                 f"serves it from ({profile.folder}): another instance on this node "
                                 f"registered the id from there, or the files changed since")


class ModelSwitcher:
    def __init__(self, cache: HostModelCache, arena: DeviceArena, max_positions: int,
                 engine: str = "native", block_size: int = 16, attention: str = "auto") -> None:
        """engine, block_size, attention: what each slot's backend is built as (model_backend.py)."""
        self.cache = cache
        self.arena = arena
        self.max_positions = max_positions
        self.engine, self.block_size, self.attention = engine, block_size, attention
        # One backend per (config, slot): the slot being filled is bound in the background
        # while the other slot's backend computes, so a prefetched switch re-binds nothing.
        self._modules: dict[tuple[ModelConfig, torch.dtype, torch.dtype, int], ModelBackend] = {}
        self._bound: dict[tuple[ModelConfig, torch.dtype, torch.dtype, int], tuple[str, int]] = {}
        self._leases: dict[str, CachedModel] = {}
        # Leases pin models in the host cache. With a catalogue larger than the cache, models not
        # being copied must be evictable: leases close after each fill (re-attached on return).
        self.release_idle_leases = False
        # (slot, model, offset) -> flat (destination, source) views, made once: making a tensor
        # view costs microseconds, a small model's whole copy a few dozen.
        self._copy_views: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._slots: list[SlotContents | None] = [None, None]
        self._active = 0
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.cuda_copier = CudaSlotCopier(arena.device) if arena.device.type == "cuda" else None

    @property
    def active_model(self) -> str | None:
        slot = self._slots[self._active]
        return slot.model_id if slot else None

    def is_prefetched(self, model_id: str) -> bool:
        """The free slot holds (or is being filled with) model_id."""
        slot = self._slots[1 - self._active]
        return slot is not None and slot.model_id == model_id

    def prefetch(self, profile: ModelProfile) -> Future:
        """Start copying profile's weights into the free slot while the active model computes."""
        return self._claim_free_slot(profile, lambda fill: self._copier.submit(fill))

    def activate(self, profile: ModelProfile) -> ModelBackend:
        """Make profile the active model: reuse it, take the prefetched slot, or copy now
        (on this thread: a cold switch does not pay a hand-off to the copier)."""
        if self.active_model != profile.model_id:
            self._claim_free_slot(profile, _run_now).result()
            self._active = 1 - self._active
        return self._slots[self._active].model

    def discard(self, model_id: str) -> None:
        """Empty the free slot if it holds model_id (waiting for a fill still writing it) and let
        go of model_id's lease, so a model removed from the catalogue leaves no bytes pinned."""
        if self.is_prefetched(model_id):
            wait([self._slots[1 - self._active].ready])
            self._slots[1 - self._active] = None
        for key in [k for k, (bound, _) in self._bound.items() if bound == model_id]:
            del self._bound[key]
        for key in [k for k in self._copy_views if k[1] == model_id]:
            del self._copy_views[key]
        lease = self._leases.pop(model_id, None)
        if lease is not None:
            lease.close()

    def _claim_free_slot(self, profile: ModelProfile, start: Callable) -> Future:
        free = 1 - self._active
        slot = self._slots[free]
        if slot is not None and slot.model_id == profile.model_id:
            return slot.ready
        self._check_fits(profile)
        if slot is not None and not slot.ready.done():
            wait([slot.ready])  # an earlier prefetch still writing the slot must finish first
        contents = SlotContents(profile.model_id, None, Future())
        if self.cuda_copier is not None:  # kernels still queued may read the slot's old weights
            contents.after = torch.cuda.current_stream(self.arena.device).record_event()
        self._slots[free] = contents
        contents.ready = start(lambda: self._fill_slot(free, profile, contents))
        return contents.ready

    def _check_fits(self, profile: ModelProfile) -> None:
        # Alignment padding can push a model that passed registration just past a slot.
        capacity = self.arena.slots[0].capacity
        padded = profile.slot_bytes
        if padded > capacity:
            raise MemoryError(f"model {profile.model_id} needs {padded} bytes of weights with "
                              f"alignment; an arena model slot holds {capacity}")

    def _fill_slot(self, index: int, profile: ModelProfile, contents: SlotContents) -> None:
        """Copy the cached segment into the slot as is (one pass over its bytes), then
        point the slot's module at it."""
        region: BumpRegion = self.arena.slots[index]
        region.reset()
        cached = self._lease(profile)
        base = region.alloc(cached.raw.numel())
        views = self._copy_views.get((index, profile.model_id, base))
        if views is None:
            views = self._copy_views[index, profile.model_id, base] = (
                self.arena.buffer[base:base + cached.raw.numel()], cached.raw.reshape(-1))
        if self.cuda_copier is not None:
            self.cuda_copier.copy(*views, after=contents.after)
        else:
            _chunked_copy(*views)
        contents.model = self._bind(profile, cached, index, base)
        if self.release_idle_leases:  # a CUDA copy may still be reading this lease's mapping (DMA)
            self._release_leases(keep=profile.model_id if self.cuda_copier is not None else None)

    def _release_leases(self, keep: str | None) -> None:
        """Close every lease but keep's, so the host cache may evict those models: the slots hold
        their own copies, and a later fill attaches again. Fills never overlap, so no copy reads
        these leases now (on the CPU the copy just made has ended)."""
        for model_id in [m for m in self._leases if m != keep]:
            for key in [k for k in self._copy_views if k[1] == model_id]:
                del self._copy_views[key]
            self._leases.pop(model_id).close()

    def _lease(self, profile: ModelProfile) -> CachedModel:
        model_id = profile.model_id
        if model_id not in self._leases:
            lease = self.cache.attach(model_id)
            try:
                check_layout(profile, lease)
            except ModelConflictError:
                lease.close()
                raise
            self._leases[model_id] = lease
            if self.cuda_copier is not None:
                self.cuda_copier.pin(lease)
        return self._leases[model_id]

    def prepare(self, profile: ModelProfile) -> None:
        """Build the backends profile's shape needs in both slots, now, on the caller's thread (a
        registration), so a fill on the copier thread only re-binds: building may set process-wide
        state (vLLM's layers take their dtype from torch's default) that a step must not see."""
        for slot in range(len(self._slots)):
            self._backend(profile, slot)

    def _backend(self, profile: ModelProfile, slot: int) -> ModelBackend:
        key = (profile.config, profile.dtype, profile.compute_dtype, slot)
        backend = self._modules.get(key)
        if backend is None:  # weights in a slot are applied as they lie (see BackendSpec)
            backend = self._modules[key] = make_model_backend(self.engine, BackendSpec(
                profile.folder, profile.config, profile.compute_dtype, self.max_positions,
                str(self.arena.device), self.block_size, "dense", self.attention, profile.dtype))
        return backend

    def _bind(self, profile: ModelProfile, cached: CachedModel, slot: int, base: int) -> ModelBackend:
        """The backend for (config, slot), pointed at the model's weights at base; a backend
        already bound to exactly those bytes is returned as it is."""
        key = (profile.config, profile.dtype, profile.compute_dtype, slot)
        backend = self._backend(profile, slot)
        if self._bound.get(key) == (profile.model_id, base):
            return backend
        backend.bind_weights({name: self.arena.view(base + offset, dtype, shape)
                              for name, (dtype, shape, offset) in cached.layout.items()})
        self._bound[key] = (profile.model_id, base)
        return backend

    def close(self) -> None:
        self._copier.shutdown(wait=True)
        self._copy_views.clear()  # they hold the leases' mappings
        for lease in self._leases.values():
            lease.close()
        self._leases.clear()


def _run_now(fn: Callable[[], None]) -> Future:
    """Run fn on this thread, settling a future as an executor would."""
    future: Future = Future()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits, like an executor
        future.set_exception(exc)
    else:
        future.set_result(None)
    return future


def _chunked_copy(dest: torch.Tensor, src: torch.Tensor) -> None:
    """Copy in pieces of about 8 MiB so a background copy yields the GIL often."""
    step = max(1, _CHUNK_BYTES // max(1, dest.element_size()))
    if dest.dim() == 1 and src.dim() == 1 and dest.numel() <= step:  # one flat piece: no new views
        dest.copy_(src)
        return
    flat_dest, flat_src = dest.view(-1), src.reshape(-1)
    for start in range(0, flat_dest.numel(), step):
        flat_dest[start:start + step].copy_(flat_src[start:start + step])


class CudaSlotCopier:
    """Host cache -> arena slot on CUDA: copies on a dedicated stream, each after an event
    on the compute stream, and waited for on the copying thread (a finished fill means the
    weights have landed). A page-locked lease is copied by one DMA; one that could not be
    page-locked goes through two pinned staging buffers, the CPU filling one while the
    other is in flight."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pinned_leases = 0
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None]] | None = None

    def pin(self, lease: CachedModel) -> None:
        """Page-lock a lease's mapping (once per lease); a refusal leaves the staged path."""
        try:
            self.pinned_leases += lease.pin_for_cuda()
        except RuntimeError as exc:  # e.g. a locked-memory limit: slower, still correct
            log.warning("cannot page-lock %s for DMA (%s); copying through pinned staging",
                        lease.model_id, exc)

    def copy(self, dest: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        """dest (device), src (host): flat uint8 tensors of one size."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            if src.is_pinned():
                dest.copy_(src, non_blocking=True)
            else:
                self._staged(dest, src)
            done = self.stream.record_event()
        done.synchronize()

    def _staged(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        if self._staging is None:
            self._staging = [(torch.empty(_STAGING_BYTES, dtype=torch.uint8, pin_memory=True), None)
                             for _ in range(2)]
        for i, start in enumerate(range(0, src.numel(), _STAGING_BYTES)):
            buffer, in_flight = self._staging[i % 2]
            if in_flight is not None:
                in_flight.synchronize()  # its previous DMA has finished reading it
            n = min(_STAGING_BYTES, src.numel() - start)
            buffer[:n].copy_(src[start:start + n])
            dest[start:start + n].copy_(buffer[:n], non_blocking=True)
            self._staging[i % 2] = (buffer, self.stream.record_event())
