"""A discrete-event simulation of a tokenpool fleet that drives the real scheduler classes.

Each instance is an actor on its own thread, but only one runs at a time: the world hands
a baton to whichever actor's next event is earliest, so the simulation is sequential and
deterministic. A decode actor runs the live policy class unchanged (DecodeScheduler,
RequestLevelTurns, RoundRobinTurns, built by the instances' own make_decode_policy) over
a simulated TurnRunner whose steps and switches advance the simulated clock by the
profile's predictions; a prefill actor runs the live grouped-FCFS PrefillQueue. Dispatch
uses the proxy's placement functions.

    arrival -> prefill queue (grouped FCFS) -> prefill time -> first token
            -> decode instance (dispatch) -> batch joins at its model's next turn -> tokens

The clock's decode steps come from the profile's measured step tables where it has them
(StepTable: CPU steps are not linear in the batch), else from the line the schedulers use;
the serving path's own costs from its ServingOverhead (both measured by `tokenpool profile
--live-clock`, neither in GPU profiles): each request's first token after its prefill, each
decode step's token streaming, a decode step's slowdown while a prefill instance computes
and a prefill's while a decode instance has work (CPU instances share cores). The
schedulers predict with the line, as live instances do.

A decode instance's device KV region (SimConfig.decode_kv_bytes, in the profile's KV blocks)
bounds its running batch as the engine's scheduler does: the most recently admitted
sequence is preempted when the batch outgrows it and computes its whole history again
(a prefill of its length) when room comes back. Its host KV pool
(SimConfig.decode_host_kv_bytes) holds handed-over sequences until they join a batch and
the batches switched away from: a hand-off it has no room for fails (live:
RESOURCE_EXHAUSTED), and a switch away whose batch it has no room for is refused, so the
active model keeps the device (as the live worker). What is left out: the prefill
instances' KV, the hand-off pool, and any contention beyond the measured overhead.

`tokenpool sim` on a GPU profile sizes both from the hardware (gpu_profiles.plan_memory):
the KV region is the GPU's memory less the library's reserve and two slots of the point's
largest model, in 16-token blocks of each model's real shape, swapped over the host link;
the host pool is --host-kv-gib. --no-kv-limits runs the old, unbounded setting.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenpool.bench.metrics import RequestResult
from tokenpool.decode_svc.decode_policy import make_decode_policy
from tokenpool.engine.step_profiler import InstanceTimings
from tokenpool.engine.turn_policy import (
    BatchInfo,
    TurnPolicy,
    check_policy,
)
from tokenpool.prefill_svc.prefill_scheduler import MAX_GROUP_SIZE, PrefillQueue
from tokenpool.proxy.dispatcher import MAX_BATCH, InstanceLoad, join_or_fewest_batches, serving_or_idle


@dataclass
class SimRequest:
    request_id: str
    model: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    token_times: list[float] = field(default_factory=list)
    decode: object = None  # the SimDecode it was dispatched to

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + len(self.token_times)

    @property
    def finished(self) -> bool:
        return len(self.token_times) >= self.max_tokens


FAILED_SWITCH_S = 1e-3  # what a switch refused for want of host pool room costs the turn


class World:
    """The simulated clock and the baton: events run in time order, one actor at a time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list = []
        self._order = itertools.count()
        self._yielded = threading.Semaphore(0)

    def at(self, time: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (time, next(self._order), fn))

    def run(self) -> None:
        while self._events:
            time, _, item = heapq.heappop(self._events)
            self.now = max(self.now, time)
            if isinstance(item, Actor):
                item.resume()
            else:
                item()


class _Stopped(Exception):
    """Unwinds an actor's thread when the simulation is over."""


class Actor:
    """A thread that runs only while it holds the world's baton."""

    def __init__(self, world: World, body: Callable[[Actor], None], name: str) -> None:
        self.world = world
        self.parked = False
        self.stopped = False
        self._go = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, args=(body,), name=name, daemon=True)
        self._thread.start()
        world.at(0.0, self)

    def _main(self, body) -> None:
        self._go.acquire()
        try:
            if not self.stopped:
                body(self)
        except _Stopped:
            pass

    def stop(self) -> None:
        """End the thread (it is parked or waiting: the world has no more events)."""
        self.stopped = True
        self._go.release()

    def resume(self) -> None:
        self._go.release()
        self.world._yielded.acquire()

    def sleep(self, seconds: float) -> None:
        self.world.at(self.world.now + max(0.0, seconds), self)
        self._yield()

    def park(self) -> None:
        """Wait until someone wake()s this actor."""
        self.parked = True
        self._yield()

    def wake(self) -> None:
        if self.parked:
            self.parked = False
            self.world.at(self.world.now, self)

    def _yield(self) -> None:
        self.world._yielded.release()
        self._go.acquire()
        if self.stopped:
            raise _Stopped


class SimDecodeRunner:
    """The TurnRunner of a simulated decode instance."""

    def __init__(self, world: World, timings: InstanceTimings, on_finish: Callable[[SimRequest], None],
                 prefill_busy: Callable[[], bool], kv_bytes: int | None = None,
                 host_kv_bytes: int | None = None, host_slab_bytes: int = 4 << 20) -> None:
        """timings: the clock's step (clock_step_seconds), switch and serving-overhead times.
        kv_bytes: the device KV region, which every model's running batch has to itself (its
        KV is swapped out at a switch), in blocks of the profile's KV block size; host_kv_bytes:
        the host KV pool (SimHostPool). None (or a model without measured KV blocks): no limit."""
        self.world, self.timings, self.on_finish, self.prefill_busy = world, timings, on_finish, prefill_busy
        self.kv_blocks = {m: kv_bytes // t.block_bytes for m, t in timings.kv_swap.items()} \
            if kv_bytes is not None else {}
        self.recompute: set[str] = set()  # preempted: no KV; its whole history is computed again
        self.preemptions = 0
        self.kv_held_back = 0  # steps at which a waiting sequence had batch room but no KV room
        self.kv_peak = 0.0  # the fullest the KV region was at a step (a fraction)
        self.pool = SimHostPool(host_kv_bytes, host_slab_bytes) if host_kv_bytes is not None else None
        self.pooled: dict[str, int] = {}  # request_id -> its KV blocks in the host pool
        self.refused = self.failed_switches = 0
        self.actor: Actor | None = None
        self.batches: dict[str, list[SimRequest]] = {}
        self.incoming: dict[str, list[SimRequest]] = {}
        self.arrivals: dict[str, str] = {}
        self.slots = SimSlots(timings)
        self.switches = 0
        # KV swaps, as the instance's one swapper thread runs them: one after another.
        self.swapper_free_at = 0.0
        self.landing: dict[str, float] = {}  # request_id -> when its KV is back on the device
        self.switched_in: dict[str, float] = {}  # model -> when the last switch's swap-ins end

    def admit(self, request: SimRequest) -> None:
        """A handed-over sequence: its prompt's KV is staged in the host pool at once, or, the
        pool full, the hand-off is refused and the request fails (live: RESOURCE_EXHAUSTED)."""
        if not self._pool_take(request.model, [request], request.prompt_tokens):
            self.refused += 1
            self.on_finish(request)
            return
        self.incoming.setdefault(request.model, []).append(request)
        self.arrivals[request.request_id] = request.model
        self.actor.wake()

    def _pool_take(self, model: str, seqs: list[SimRequest], tokens: int | None = None) -> bool:
        """Room in the host pool for the sequences' KV (tokens of one, else each one's length)."""
        swap = self.timings.kv_swap.get(model)
        if self.pool is None or swap is None:
            return True
        need = {s.request_id: -(-(s.seq_len if tokens is None else tokens) // swap.block_size)
                for s in seqs}
        if not self.pool.take(swap.block_bytes, sum(need.values())):
            return False
        self.pooled.update(need)
        return True

    def _pool_give(self, model: str, seq: SimRequest) -> None:
        blocks = self.pooled.pop(seq.request_id, 0)
        if blocks:
            self.pool.give(self.timings.kv_swap[model].block_bytes, blocks)

    def now(self) -> float:
        return self.world.now

    @property
    def active(self) -> str | None:
        return self.slots.active

    def models_with_work(self) -> list[str]:
        models = {m for m, b in self.batches.items() if b} | {m for m, q in self.incoming.items() if q}
        return [m for m in dict.fromkeys(self.arrivals.values()) if m in models]

    def batch(self, model: str) -> BatchInfo:
        seqs = self.batches.get(model, []) + self.incoming.get(model, [])
        return BatchInfo(model, len(seqs), sum(s.seq_len for s in seqs))

    def has_work(self, model: str) -> bool:
        return bool(self.batches.get(model) or self.incoming.get(model))

    def ready(self, model: str) -> bool:
        return True  # every model's weights are in the simulated host cache

    def activate(self, model: str) -> bool:
        """As MultiModelEngine.switch_to: the outgoing batch's KV is swapped out while the weights
        are copied (unless prefetched), the switch waits for both, then the incoming batch's KV
        starts swapping in."""
        if model != self.active:
            outgoing = self.batches.get(self.active, [])
            if outgoing and not self._pool_take(self.active, outgoing):
                # As the live worker: the active model keeps the device until the pool has room.
                self.failed_switches += 1
                self.actor.sleep(FAILED_SWITCH_S)
                return False
            swapped_out = self.world.now
            for seq in outgoing:
                swapped_out = self._swap(self.active, seq, "out")
            weights = self.slots.activate(model, self.world.now)
            self.actor.sleep(max(weights, swapped_out - self.world.now))
            self.switches += 1
            self.switched_in[model] = -math.inf
            for seq in self.batches.get(model, []):
                self.landing[seq.request_id] = self.switched_in[model] = self._swap(model, seq, "in")
                self._pool_give(model, seq)
        return True

    def kv_landed_at(self, model: str) -> float | None:
        landed = self.switched_in.get(model, -math.inf)
        return None if landed > self.world.now else landed

    def _swap(self, model: str, seq: SimRequest, direction: str) -> float:
        """Queue one sequence's KV swap on the swapper -> when it is done."""
        start = max(self.world.now, self.swapper_free_at)
        self.swapper_free_at = start + self.timings.kv_swap_seconds(model, seq.seq_len, direction)
        return self.swapper_free_at

    def _landed(self, batch: list[SimRequest]) -> list[SimRequest]:
        """The sequences whose KV is on the device; waits for the first if none is, as a live
        step does."""
        if not batch:
            return []
        first = min(self.landing.get(s.request_id, 0.0) for s in batch)
        if first > self.world.now:
            self.actor.sleep(first - self.world.now)
        return [s for s in batch if self.landing.get(s.request_id, 0.0) <= self.world.now]

    def prefetch(self, model: str) -> None:
        self.slots.prefetch(model, self.world.now)

    def _blocks(self, model: str, seqs) -> int:
        """KV blocks the sequences take through this step (their tokens and the next one's)."""
        size = self.timings.kv_swap[model].block_size
        return sum(-(-(s.seq_len + 1) // size) for s in seqs)

    def _fits(self, model: str, batch: list[SimRequest], seq: SimRequest) -> bool:
        """Room in the KV region for seq beside the batch (always, for a batch's first)."""
        limit = self.kv_blocks.get(model)
        return limit is None or not batch or self._blocks(model, batch + [seq]) <= limit

    def _make_room(self, model: str, batch: list[SimRequest], waiting: list[SimRequest]) -> None:
        """As the engine's scheduler: while the running batch outgrows the KV region, the most
        recently admitted sequence is preempted (its blocks freed; it waits at the front, to
        compute its whole history again)."""
        limit = self.kv_blocks.get(model)
        while limit is not None and len(batch) > 1 and self._blocks(model, batch) > limit:
            seq = batch.pop()
            self.landing.pop(seq.request_id, None)
            self.recompute.add(seq.request_id)
            waiting.insert(0, seq)
            self.preemptions += 1

    def step(self, model: str) -> int:
        batch = self.batches.setdefault(model, [])
        waiting = self.incoming.setdefault(model, [])
        self._make_room(model, batch, waiting)
        while waiting and len(batch) < MAX_BATCH and self._fits(model, batch, waiting[0]):
            seq = waiting.pop(0)
            batch.append(seq)
            if seq.request_id not in self.recompute:
                self.landing[seq.request_id] = self._swap(model, seq, "in")  # from the pool it was handed to
                self._pool_give(model, seq)
        limit = self.kv_blocks.get(model)
        if limit:
            self.kv_peak = max(self.kv_peak, self._blocks(model, batch) / limit)
            self.kv_held_back += bool(waiting and len(batch) < MAX_BATCH)
        ready = self._landed(batch)
        if not ready:
            return 0
        again = [s for s in ready if s.request_id in self.recompute]
        decoding = [s for s in ready if s.request_id not in self.recompute]
        engine_s = self.timings.clock_step_seconds(model, sum(s.seq_len for s in decoding), len(decoding)) \
            if decoding else 0.0
        engine_s += sum(self.timings.prefill_seconds(model, s.seq_len) for s in again)
        self.actor.sleep(self.timings.serving.decode_step(engine_s, len(ready), self.prefill_busy())
                         + self.slots.take_copy_cost(self.world.now))
        self.recompute.difference_update(s.request_id for s in again)
        for seq in ready:
            seq.token_times.append(self.world.now)
        for seq in [s for s in ready if s.finished]:
            batch.remove(seq)
            self.arrivals.pop(seq.request_id, None)
            self.landing.pop(seq.request_id, None)
            self.on_finish(seq)
        return len(ready)


class SimHostPool:
    """A decode instance's host KV pool, as HostKVPool keeps it: slabs of SLAB_BYTES, each
    holding whole blocks of one shape (here: one block size)."""

    def __init__(self, capacity_bytes: int, slab_bytes: int = 4 << 20) -> None:
        self.slabs, self.slab_bytes = capacity_bytes // slab_bytes, slab_bytes
        self.blocks: dict[int, int] = {}  # block bytes -> blocks held

    def take(self, block_bytes: int, n: int) -> bool:
        """Hold n more blocks if their slabs fit, else nothing changes."""
        held = {**self.blocks, block_bytes: self.blocks.get(block_bytes, 0) + n}
        if sum(-(-count // max(1, self.slab_bytes // size)) for size, count in held.items()) > self.slabs:
            return False
        self.blocks = held
        return True

    def give(self, block_bytes: int, n: int) -> None:
        self.blocks[block_bytes] -= n


class SimSlots:
    """A simulated instance's two arena slots, as ModelSwitcher keeps them: the active model's,
    and the free one, holding the model switched away from or the one being prefetched. A
    prefetch copy costs the compute beside it (ServingOverhead's prefetch_factor per second of
    copy), charged to the instance's next step or prefill if that starts while the copy runs."""

    def __init__(self, timings: InstanceTimings) -> None:
        self.timings = timings
        self.active: str | None = None
        self.free: tuple[str, float] | None = None  # (model, when its copy started)
        self.owed = 0.0
        self.until = 0.0

    def activate(self, model: str, now: float) -> float:
        """Make model active -> seconds until its weights are ready: none if active, the rest of
        its prefetch, else a whole copy. The free slot keeps the outgoing model, so switching
        back, or prefetching it, copies nothing."""
        if model == self.active:
            return 0.0
        cost = self.timings.switch_seconds(model)
        if self.free is not None and self.free[0] == model:
            cost = max(0.0, cost - (now - self.free[1]))
        self.free = (self.active, -math.inf) if self.active is not None else None
        self.active = model
        return cost

    def prefetch(self, model: str, now: float) -> None:
        """Start copying model into the free slot unless it is there (or active)."""
        if model == self.active or (self.free is not None and self.free[0] == model):
            return
        self.free = (model, now)
        factor = self.timings.serving.prefetch_factor
        if factor:
            copy_s = self.timings.switch_seconds(model)
            self.owed += factor * copy_s
            self.until = max(self.until, now) + copy_s * (1 + factor)

    def take_copy_cost(self, now: float) -> float:
        """What the work starting now loses to prefetch copies (charged once)."""
        owed, self.owed = (self.owed if now < self.until else 0.0), 0.0
        return owed


@dataclass
class SimDecode:
    name: str
    runner: SimDecodeRunner
    policy: TurnPolicy
    load: InstanceLoad = field(default_factory=InstanceLoad)


@dataclass
class SimConfig:
    policy: str
    num_prefill: int
    num_decode: int
    tbt_s: float
    qmax_s: float = 4.0
    decode_kv_bytes: int | None = None  # a decode instance's device KV region; None: unlimited
    decode_host_kv_bytes: int | None = None  # and its host KV pool; None: unlimited
    host_slab_bytes: int = 4 << 20  # the host pool's slab (live: HostKVPool's, 64 MiB by default)

    def __post_init__(self) -> None:
        check_policy(self.policy)
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError(f"need >= 1 prefill and decode instances, got {self.num_prefill} and "
                             f"{self.num_decode}")


class Simulation:
    """One run: the requests of a trace through the fleet; results per request."""

    def __init__(self, config: SimConfig, timings: InstanceTimings, models: Sequence[str]) -> None:
        """timings: every model's profile and the bandwidth switches copy weights at."""
        self.config, self.timings = config, timings
        self.profiles = timings.profiles
        self.models = list(models)
        if config.policy == "static" and len(self.models) > min(config.num_prefill, config.num_decode):
            raise ValueError(f"static needs an instance of each kind per model: {len(self.models)} models")
        self.world = World()
        self._pending: dict[str, SimRequest] = {}
        self.prefill = [self._prefill_actor(i) for i in range(config.num_prefill)]
        self.decode = [self._decode_instance(i) for i in range(config.num_decode)]
        self.waiting: list[SimRequest] = []  # request policy: waiting for a decode instance
        self.prefill_load = [0] * config.num_prefill
        self.prefill_computing = 0  # prefill instances in a switch or prefill now

    def run(self, requests: Sequence[SimRequest]) -> list[RequestResult]:
        for request in requests:
            self.world.at(request.arrival_s, lambda r=request: self._arrive(r))
        try:
            self.world.run()
        finally:
            for actor in [a for _, a in self.prefill] + [d.runner.actor for d in self.decode]:
                actor.stop()
        return [RequestResult(r.arrival_s, r.token_times, r.finished) for r in requests]

    # -- placement ---------------------------------------------------------------

    def _arrive(self, request: SimRequest) -> None:
        if self.config.policy == "request":
            self.waiting.append(request)
            self._admit_waiting()
        else:
            self._start(request, self._choose_decode(request.model))

    def _choose_decode(self, model: str) -> SimDecode:
        if self.config.policy == "static":
            return self.decode[self.models.index(model)]
        return join_or_fewest_batches(model, self.decode, MAX_BATCH)

    def _admit_waiting(self) -> None:
        """request policy: FCFS; a request takes the instance serving its model, or an idle one."""
        while self.waiting:
            choice = serving_or_idle(self.waiting[0].model, self.decode)
            if choice is None:
                return
            self._start(self.waiting.pop(0), choice)

    def _start(self, request: SimRequest, decode: SimDecode) -> None:
        decode.load.add(request.model)
        request.decode = decode
        index = self._choose_prefill(request.model)
        queue, actor = self.prefill[index]
        queue.add(request.request_id, request.model, self.profiles[request.model].prefill.predict(
            request.prompt_tokens))
        self._pending[request.request_id] = request
        self.prefill_load[index] += 1
        actor.wake()

    def _choose_prefill(self, model: str) -> int:
        if self.config.policy == "static":
            return self.models.index(model)
        for i, (queue, _) in enumerate(self.prefill):
            if queue.group_with_room(model) is not None:
                return i
        return min(range(len(self.prefill)), key=lambda i: self.prefill_load[i])

    # -- actors ----------------------------------------------------------------------

    def _prefill_actor(self, index: int):
        group = MAX_GROUP_SIZE if self.config.policy == "aegaeon" else 1
        queue = PrefillQueue(group)
        slots = SimSlots(self.timings)

        def body(actor: Actor) -> None:
            while True:
                head = queue.pop_next()
                if head is None:
                    actor.park()
                    continue
                request = self._pending.pop(head[0])
                self.prefill_computing += 1
                if slots.active != request.model:
                    actor.sleep(slots.activate(request.model, self.world.now))
                following = queue.next_other_model(request.model)
                if following is not None:  # as GroupedFcfsTurns
                    slots.prefetch(following, self.world.now)
                prefill = self.profiles[request.model].prefill.predict(request.prompt_tokens)
                factor = self.timings.serving.corun_prefill_factor
                if factor != 1 and any(d.runner.models_with_work() for d in self.decode):
                    prefill *= factor
                actor.sleep(prefill + slots.take_copy_cost(self.world.now))
                self.prefill_computing -= 1
                if self.timings.serving.request_s:  # the first token's way out (hand-off, RPCs)
                    actor.sleep(self.timings.serving.request_s)
                request.token_times.append(self.world.now)
                self.prefill_load[index] -= 1
                if request.finished:
                    self._finish(request)
                else:
                    request.decode.runner.admit(request)

        return queue, Actor(self.world, body, f"prefill-{index}")

    def _decode_instance(self, index: int) -> SimDecode:
        runner = SimDecodeRunner(self.world, self.timings, self._finish, lambda: self.prefill_computing > 0,
                                 self.config.decode_kv_bytes, self.config.decode_host_kv_bytes,
                                 self.config.host_slab_bytes)
        policy = make_decode_policy(self.config.policy, self.timings, self.config.tbt_s * 1e3,
                                    self.config.qmax_s)

        def body(actor: Actor) -> None:
            while True:
                if not policy.run_turn(runner):
                    actor.park()

        runner.actor = Actor(self.world, body, f"decode-{index}")
        return SimDecode(f"decode-{index}", runner, policy)

    def _finish(self, request: SimRequest) -> None:
        request.decode.load.remove(request.model)
        if self.config.policy == "request":
            self._admit_waiting()


# -- `tokenpool sim`: the paper's setting on measured GPU profiles -------------------------

SHAPE_MIX = ("qwen2_5_7b", "qwen2_5_7b", "qwen2_5_7b", "yi1_5_9b_chat", "llama2_13b_chat")  # 60/20/20
CHARS_PER_TOKEN = 4  # prompts are counted by a rule of thumb: these models' tokenizers are not here
HOST_KV_GIB = 64.0  # a decode instance's host KV pool in the GPU setting (see --host-kv-gib)
HOST_SLAB_BYTES = 64 << 20  # the live HostKVPool's default slab


def add_parser(commands) -> None:
    p = commands.add_parser("sim", help="simulate a fleet on measured GPU profiles (the paper's setting)")
    p.add_argument("--profile", default="h800", help="h800, h100, h20, a100, a10 or a JSON path")
    p.add_argument("--policies", default="aegaeon,request")
    p.add_argument("--prefill", type=int, default=6)
    p.add_argument("--decode", type=int, default=10)
    p.add_argument("--rate", type=float, default=0.1, help="requests per second, per model")
    p.add_argument("--models", default="16,32,48,64,80", help="numbers of models to sweep")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per point")
    p.add_argument("--ttft-s", type=float, default=10.0)
    p.add_argument("--tbt-ms", type=float, default=100.0)
    p.add_argument("--max-output-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="each GPU's memory (default: the profile's GPU: H800, H100, A100 80, H20 96, A10 24)")
    p.add_argument("--memory-reserve", type=float, default=None,
                   help="share of device memory left to the tensor library (default 0.10, as the paper)")
    p.add_argument("--host-kv-gib", type=float, default=HOST_KV_GIB,
                   help="each decode instance's host KV pool (default %(default)g: half of a 1 TiB, "
                        "8-GPU node's per-GPU share; the other half for the host model cache)")
    p.add_argument("--kv-swap-gbps", type=float, default=None,
                   help="KV swap rate between device and host pool (default: the host link's, as weights)")
    p.add_argument("--no-kv-limits", action="store_true",
                   help="GPU profiles: no device-memory model (unbounded KV, KV moves in no time), as before")
    p.add_argument("--json", type=Path, default=None, help="the report (required unless --replot)")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG of attainment against the number of models (default: beside --json)")
    p.add_argument("--replot", type=Path, action="append", default=[], metavar="REPORT",
                   help="no simulation: draw --plot from past `tokenpool sim` reports of one setting "
                        "(repeatable: a sweep and its extensions are drawn as one curve per policy)")
    p.set_defaults(run=run_cli)


def run_cli(args) -> None:
    if args.replot:
        if args.plot is None:
            raise ValueError("--replot needs --plot (where to draw)")
        replot(args.replot, args.plot)
        print(f"wrote {args.plot}")
        return
    if args.json is None:
        raise ValueError("--json is required (where to write the report)")
    from tokenpool.bench import gpu_profiles
    from tokenpool.bench.metrics import SLO, goodput, summarize
    from tokenpool.bench.serve_bench import machine
    from tokenpool.bench.sharegpt import load_pairs

    gpu = gpu_profiles.load(args.profile)
    policies = [p for p in args.policies.split(",") if p]
    counts = sorted(int(n) for n in args.models.split(","))
    slo = SLO(args.ttft_s, args.tbt_ms / 1e3)
    shapes = [s for s in SHAPE_MIX if s in gpu.models] or list(gpu.models)

    def shapes_of(count: int) -> dict[str, str]:
        return {f"m{i:03d}": shapes[i % len(shapes)] for i in range(count)}

    memory = _memory_setting(args, gpu, {n: shapes_of(n) for n in counts})  # refused here, before any run
    pairs = load_pairs()
    report = {"command": getattr(args, "command_line", None), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": machine(), "sweep": "models", "profile": gpu.gpu, "h2d_gbps": gpu.h2d_gbps,
              "rate_per_model": args.rate,
              "slo": {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s},
              "memory": memory["report"] if memory else None, "policies": {}}
    for policy in policies:
        points = []
        for count in counts:
            shape_of = shapes_of(count)
            names = list(shape_of)
            requests = _requests(names, args, pairs)
            if memory:
                with_kv = gpu_profiles.with_kv(gpu, set(shape_of.values()), args.kv_swap_gbps)
                timings = with_kv.timings(shape_of)
                config = SimConfig(policy, args.prefill, args.decode, slo.tbt_s,
                                   decode_kv_bytes=memory["plans"][count].kv_bytes,
                                   decode_host_kv_bytes=memory["host_kv_bytes"],
                                   host_slab_bytes=HOST_SLAB_BYTES)
            else:
                timings = gpu.timings(shape_of)
                config = SimConfig(policy, args.prefill, args.decode, slo.tbt_s)
            sim = Simulation(config, timings, names)
            point = summarize(count, sim.run(requests), slo)
            kv = _kv_counters(sim, memory["plans"][count]) if memory else None
            detail = (f" (preempted {kv['preemptions']}, steps holding one back for KV "
                      f"{kv['steps_with_a_sequence_held_back_for_kv']}, "
                      f"KV peak {kv['kv_peak_fraction']:.0%}, "
                      f"hand-offs refused {kv['refused_handoffs']}, "
                      f"switches refused {kv['refused_switches']})") if kv else ""
            switches = sum(d.runner.switches for d in sim.decode)
            print(f"[{policy}] {count} models: attainment {point.attainment:.1%}, {switches} decode switches"
                  f"{detail}", file=sys.stderr, flush=True)
            points.append((point, kv, switches))
        try:
            best = goodput([p for p, _, _ in points])
        except ValueError as exc:
            best, note = 0.0, str(exc)
        else:
            note = None
        rows = [{**asdict(p), "decode_switches": n, **({"kv": kv} if kv else {})} for p, kv, n in points]
        report["policies"][policy] = {"goodput": best, "points": rows,
                                      **({"note": note} if note else {})}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    plot = args.plot or args.json.with_suffix(".png")
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    try:
        _plot([(args.json, report)], plot)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(args.json)
    for policy, result in report["policies"].items():
        cells = ", ".join(f"{p['load']:g} models {p['attainment']:.0%}" for p in result["points"])
        print(f"{policy:>10}: {cells}; goodput {result['goodput']:g} models")
    print(f"wrote {args.json} and {plot}")


def _memory_setting(args, gpu, shapes_by_count: dict[int, dict[str, str]]) -> dict | None:
    """The device-memory model of a GPU-profile run: each point's arena (its largest model's two
    slots, the KV region in the rest), the host KV pool, and what the report says of them; None
    with --no-kv-limits or a profile with no device memory (a `tokenpool profile` file) unless
    --device-memory-gib names one. DeviceMemoryError naming the numbers when the slots do not fit."""
    from tokenpool.bench import gpu_profiles

    memory_gib = args.device_memory_gib if args.device_memory_gib is not None else gpu.memory_gib
    if args.no_kv_limits or memory_gib is None:
        return None
    reserve = gpu_profiles.LIBRARY_RESERVE if args.memory_reserve is None else args.memory_reserve
    if not args.host_kv_gib > 0:
        raise ValueError(f"--host-kv-gib must be > 0, got {args.host_kv_gib!r}")
    plans = {count: gpu_profiles.plan_memory(set(shape_of.values()), memory_gib, reserve)
             for count, shape_of in shapes_by_count.items()}
    models = sorted({m for shape_of in shapes_by_count.values() for m in shape_of.values()})
    report = {"device_memory_gib": memory_gib, "library_reserve": reserve,
              "host_kv_gib_per_decode_instance": args.host_kv_gib, "host_slab_mib": HOST_SLAB_BYTES >> 20,
              "kv_swap_gbps": args.kv_swap_gbps or gpu.h2d_gbps,
              "kv_block_tokens": gpu_profiles.KV_BLOCK_TOKENS,
              "kv_bytes_per_token": {m: gpu_profiles.kv_token_bytes(m) for m in models},
              "arena_by_largest_model": {p.largest: {"slot_gib": round(p.slot_bytes / 2**30, 3),
                                                     "kv_region_gib": round(p.kv_bytes / 2**30, 3),
                                                     "kv_blocks": {m: p.kv_blocks(m) for m in models}}
                                         for p in plans.values()}}
    return {"plans": plans, "host_kv_bytes": int(args.host_kv_gib * 2**30), "report": report}


def _kv_counters(sim: Simulation, plan) -> dict:
    """What device and host memory did to a run, over its decode instances."""
    runners = [d.runner for d in sim.decode]
    return {"largest_model": plan.largest, "kv_region_gib": round(plan.kv_bytes / 2**30, 3),
            "preemptions": sum(r.preemptions for r in runners),
            "steps_with_a_sequence_held_back_for_kv": sum(r.kv_held_back for r in runners),
            "kv_peak_fraction": round(max(r.kv_peak for r in runners), 3),
            "refused_handoffs": sum(r.refused for r in runners),
            "refused_switches": sum(r.failed_switches for r in runners)}


SETTING = ("sweep", "profile", "rate_per_model", "slo")  # what reports drawn together must share


def replot(paths: Sequence[Path], plot: Path) -> None:
    """Draw past reports of one setting as one curve per policy (ValueError naming the file if
    one is not a `tokenpool sim` report, differs in setting, or repeats a policy's point)."""
    reports = []
    for path in paths:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--replot {path}: {exc}") from None
        reports.append((path, report))
    _plot(reports, plot)


def _plot(reports: Sequence[tuple[Path, dict]], path: Path) -> None:
    """One curve per policy over the reports' points (a sweep and its extensions)."""
    from tokenpool.bench.metrics import LoadPoint, goodput
    from tokenpool.bench.plots import Curve, plot_attainment

    merged: dict[str, dict[float, float]] = {}
    titles = set()
    for source, report in reports:
        try:
            slo = report["slo"]
            titles.add((tuple(str(report[key]) for key in SETTING),
                        f"{report['profile']}, {report['rate_per_model']:g} req/s per model, "
                        f"TTFT {slo['ttft_s']:g} s, TBT {slo['tbt_s'] * 1e3:g} ms"))
            if len(titles) > 1:
                raise ValueError(f"another setting than {reports[0][0]}")
            for policy, result in report["policies"].items():
                for point in result["points"]:
                    load, attainment = float(point["load"]), float(point["attainment"])
                    if load in merged.setdefault(policy, {}):
                        raise ValueError(f"{policy} at {load:g} models is in an earlier report too")
                    merged[policy][load] = attainment
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"--replot {source}: not a `tokenpool sim` report of the first one's setting "
                             f"({', '.join(SETTING)}): {type(exc).__name__}: {exc}") from None
    curves = []
    for policy, points in merged.items():
        loads = sorted(points)
        try:
            best = f"goodput {goodput([LoadPoint(n, points[n], 0, 0, 0, 0) for n in loads]):g} models"
        except ValueError:
            best = "never 90%"
        curves.append(Curve(f"{policy} ({best})", loads, [points[n] for n in loads]))
    plot_attainment(curves, "models", titles.pop()[1], path)


def _requests(names: list[str], args, pairs) -> list[SimRequest]:
    from tokenpool.bench.workload import WorkloadConfig, make_trace

    def count(text: str) -> int:
        return len(text) // CHARS_PER_TOKEN + 1

    workload = WorkloadConfig(tuple(names), args.rate, args.duration, args.seed, 2048, args.max_output_tokens)
    trace = make_trace(workload, pairs, count)
    return [SimRequest(r.request_id, r.model, r.arrival_s, count(r.prompt), r.max_tokens) for r in trace]
