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

What is left out: KV capacity limits (batches are capped at MAX_BATCH sequences) and any
contention beyond the measured overhead.
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
                 prefill_busy: Callable[[], bool]) -> None:
        """timings: the clock's step (clock_step_seconds), switch and serving-overhead times."""
        self.world, self.timings, self.on_finish, self.prefill_busy = world, timings, on_finish, prefill_busy
        self.actor: Actor | None = None
        self.batches: dict[str, list[SimRequest]] = {}
        self.incoming: dict[str, list[SimRequest]] = {}
        self.arrivals: dict[str, str] = {}
        self.slots = SimSlots(timings)
        self.switches = 0
        # KV swaps, as the instance's one swapper thread runs them: one after another.
        self.swapper_free_at = 0.0
        self.landing: dict[str, float] = {}  # request_id -> when its KV is back on the device

    def admit(self, request: SimRequest) -> None:
        self.incoming.setdefault(request.model, []).append(request)
        self.arrivals[request.request_id] = request.model
        self.actor.wake()

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

    def activate(self, model: str) -> bool:
        """As MultiModelEngine.switch_to: the outgoing batch's KV is swapped out while the weights
        are copied (unless prefetched), the switch waits for both, then the incoming batch's KV
        starts swapping in."""
        if model != self.active:
            swapped_out = self.world.now
            for seq in self.batches.get(self.active, []):
                swapped_out = self._swap(self.active, seq, "out")
            weights = self.slots.activate(model, self.world.now)
            self.actor.sleep(max(weights, swapped_out - self.world.now))
            self.switches += 1
            for seq in self.batches.get(model, []):
                self.landing[seq.request_id] = self._swap(model, seq, "in")
        return True

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

    def step(self, model: str) -> int:
        batch = self.batches.setdefault(model, [])
        waiting = self.incoming.get(model, [])
        while waiting and len(batch) < MAX_BATCH:
            seq = waiting.pop(0)
            batch.append(seq)
            self.landing[seq.request_id] = self._swap(model, seq, "in")  # from the pool it was handed to
        ready = self._landed(batch)
        if not ready:
            return 0
        engine_s = self.timings.clock_step_seconds(model, sum(s.seq_len for s in ready), len(ready))
        self.actor.sleep(self.timings.serving.decode_step(engine_s, len(ready), self.prefill_busy())
                         + self.slots.take_copy_cost(self.world.now))
        for seq in ready:
            seq.token_times.append(self.world.now)
        for seq in [s for s in ready if s.finished]:
            batch.remove(seq)
            self.arrivals.pop(seq.request_id, None)
            self.landing.pop(seq.request_id, None)
            self.on_finish(seq)
        return len(batch)


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
        runner = SimDecodeRunner(self.world, self.timings, self._finish, lambda: self.prefill_computing > 0)
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
    p.add_argument("--json", type=Path, required=True)
    p.set_defaults(run=run_cli)


def run_cli(args) -> None:
    from tokenpool.bench import gpu_profiles
    from tokenpool.bench.metrics import SLO, goodput, summarize
    from tokenpool.bench.serve_bench import machine
    from tokenpool.bench.sharegpt import load_pairs

    gpu = gpu_profiles.load(args.profile)
    policies = [p for p in args.policies.split(",") if p]
    counts = sorted(int(n) for n in args.models.split(","))
    slo = SLO(args.ttft_s, args.tbt_ms / 1e3)
    shapes = [s for s in SHAPE_MIX if s in gpu.models] or list(gpu.models)
    pairs = load_pairs()
    report = {"command": getattr(args, "command_line", None), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": machine(), "sweep": "models", "profile": gpu.gpu, "h2d_gbps": gpu.h2d_gbps,
              "rate_per_model": args.rate,
              "slo": {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s}, "policies": {}}
    for policy in policies:
        points = []
        for count in counts:
            names = [f"m{i:03d}" for i in range(count)]
            shape_of = {n: shapes[i % len(shapes)] for i, n in enumerate(names)}
            requests = _requests(names, args, pairs)
            timings = gpu.timings(shape_of)
            sim = Simulation(SimConfig(policy, args.prefill, args.decode, slo.tbt_s), timings, names)
            point = summarize(count, sim.run(requests), slo)
            print(f"[{policy}] {count} models: attainment {point.attainment:.1%}", file=sys.stderr,
                  flush=True)
            points.append(point)
        try:
            best = goodput(points)
        except ValueError as exc:
            best, note = 0.0, str(exc)
        else:
            note = None
        report["policies"][policy] = {"goodput": best, "points": [asdict(p) for p in points],
                                      **({"note": note} if note else {})}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.json)
    for policy, result in report["policies"].items():
        cells = ", ".join(f"{p['load']:g} models {p['attainment']:.0%}" for p in result["points"])
        print(f"{policy:>10}: {cells}; goodput {result['goodput']:g} models")
    print(f"wrote {args.json}")


def _requests(names: list[str], args, pairs) -> list[SimRequest]:
    from tokenpool.bench.workload import WorkloadConfig, make_trace

    def count(text: str) -> int:
        return len(text) // CHARS_PER_TOKEN + 1

    workload = WorkloadConfig(tuple(names), args.rate, args.duration, args.seed, 2048, args.max_output_tokens)
    trace = make_trace(workload, pairs, count)
    return [SimRequest(r.request_id, r.model, r.arrival_s, count(r.prompt), r.max_tokens) for r in trace]
