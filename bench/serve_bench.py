"""`tokenpool bench serve`: SLO attainment of live stacks under open-loop ShareGPT load, per policy.

For each policy a stack is started (`tokenpool up`'s launcher: 1 prefill + 1 decode instance
by default), or with --address a running one is driven (one policy, the one it runs), and
for each point of the sweep a Poisson trace of real ShareGPT prompts (reference answers'
lengths as output lengths) is replayed over gRPC; every token's arrival is recorded and
scored with the paper's attainment. The sweep varies the per-model rate (--rates), or with
--models-sweep the number of models receiving traffic at one rate (the first N of the
--model list; the stack serves them all). Goodput is the highest load at which mean
attainment stays at 90% or more, so once a point falls below --stop-below the policy's
higher loads are skipped (the report lists them).

With --sim-profile (a `tokenpool profile` file), every point is also simulated on the same
trace, instance counts, TBT target and drain cut, and the report gives the simulator's
largest gap to the live attainment, per policy.

SLOs on a CPU are scaled from the measured step, as the GPU numbers relate to a GPU step:
TBT = the decode instance's default target (4x the slowest model's single-sequence step),
TTFT = 100x TBT (the paper's 10 s over 100 ms). The report states both.

`static` gets the same instances, so it serves only the models that fit resident at once
(one per instance); requests for the others score 0, and the report names the served ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import msgspec
from tokenpool.bench.metrics import SLO, LoadPoint, RequestResult, goodput, summarize
from tokenpool.bench.workload import TraceRequest, WorkloadConfig, make_trace
from tokenpool.engine.turn_policy import POLICIES

TTFT_PER_TBT = 100.0  # the paper's 10 s TTFT over its 100 ms TBT
DRAIN_FACTOR = 3.0  # after the last arrival, wait this many trace durations for stragglers
DEFAULT_POLICIES = "aegaeon,request,static"  # the order they run in
WARMUP_PROMPT_TOKENS = 64  # at most, in the warm-up request each served model gets


def add_parser(commands) -> None:
    p = commands.add_parser("serve", help="SLO attainment and goodput of live stacks, per policy")
    p.add_argument("--model", action="append", default=[], metavar="ID[=FOLDER]",
                   help="a model to serve (repeatable; default: the four tiny models)")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help="comma-separated, from " + ", ".join(POLICIES))
    p.add_argument("--rates", default="0.25,0.5,1,2", help="per-model request rates to sweep (req/s)")
    p.add_argument("--models-sweep", default=None, metavar="N1,N2,...",
                   help="sweep the number of models receiving traffic instead (the first N of --model, "
                        "at the one rate --rates names)")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="drive this running stack (`tokenpool up`, the compose stack) instead of starting "
                        "one per policy: --policies names the one it runs, --tbt-ms is required, and "
                        "--prefill/--decode are its instance counts (for --sim-profile)")
    p.add_argument("--api", choices=("grpc", "http"), default="grpc",
                   help="drive the stack over the gRPC API (default) or the OpenAI-compatible HTTP gateway")
    p.add_argument("--gateway-url", default=None, metavar="URL",
                   help="with --address and --api http: the running stack's gateway (default "
                        "http://HOST:8000/v1, HOST being --address's)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per point")
    p.add_argument("--stop-below", type=float, default=0.5, metavar="ATTAINMENT",
                   help="skip a policy's higher loads once a point falls below this (they cannot change "
                        "its goodput; 0 runs every rate)")
    p.add_argument("--tbt-ms", type=float, default=None,
                   help="the TBT SLO (and every decode instance's target), TTFT 100x it (default: the "
                        "first policy's decode instance's own target, which needs aegaeon first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="per instance (default: cores shared out)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--raw", type=Path, default=None,
                   help="also write every request's token times (JSONL), to re-score other SLOs later")
    p.add_argument("--sim-profile", type=Path, default=None, metavar="FILE",
                   help="also simulate every point on this `tokenpool profile` file (same trace, "
                        "instances, SLO) and report the simulator's gap to the live run")
    p.add_argument("--resimulate", type=Path, default=None, metavar="REPORT",
                   help="no live run: replay the traces of a past `bench serve` report in the simulator with "
                        "--sim-profile and write it with new simulated points (to check a profile or "
                        "simulator change against a live run without repeating it)")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG of attainment against rate (default: beside --json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from tokenpool.cli.serve_command import TINY, catalogue

    if args.resimulate is not None:
        resimulate(args)
        return
    policies = _parse_policies(args.policies)
    if not 0 <= args.stop_below <= 1:
        raise ValueError(f"--stop-below {args.stop_below!r}: expected an attainment in [0, 1]")
    models = catalogue(args.model or list(TINY))
    sweep, loads = _plan(args, models)
    if args.address is not None and (len(policies) != 1 or args.tbt_ms is None):
        raise ValueError("--address drives one running stack: --policies must name the one it runs, and "
                         "--tbt-ms must state the TBT SLO")
    listed = _listed(args.address) if args.address is not None else None
    profile = _sim_profile(args.sim_profile, models) if args.sim_profile else None
    pairs, count_tokens = _conversations(models)
    report = {"sweep": sweep, "command": args.command_line, "api": args.api,
              "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "models": list(models), "duration_s": args.duration,
              "warmup": "each stack answered one request per served model (its largest output length) "
                        "before the first rate; not scored", "policies": {}}
    if args.tbt_ms is not None and not args.tbt_ms > 0:
        raise ValueError(f"--tbt-ms {args.tbt_ms!r}: expected a positive number of milliseconds")
    slo = SLO(ttft_s=TTFT_PER_TBT * args.tbt_ms / 1e3, tbt_s=args.tbt_ms / 1e3) if args.tbt_ms else None
    if sweep == "models":
        report["rate_per_model"] = _parse_rates(args.rates)[0]
    for policy in policies:
        served = _served(policy, models, args, listed)
        result, slo = _run_policy(policy, served, models, loads, pairs, count_tokens, slo, args)
        if profile is not None:
            _add_simulation(result, policy, served, models, pairs, count_tokens, slo, args, profile)
        report["policies"][policy] = result
    report["slo"] = {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s,
                     "how": ("TBT = --tbt-ms" if args.tbt_ms else "TBT = the decode instance's default "
                             "target (4x the slowest model's single-sequence step here)")
                            + f"; TTFT = {TTFT_PER_TBT:g}x TBT"}
    if profile is not None:
        report["sim_profile"] = _sim_profile_info(args.sim_profile, profile)
    _set_goodputs(report["policies"])
    report["ended"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    _write(args, report)


def _add_simulation(result, policy, served, models, pairs, count_tokens, slo, args, profile) -> None:
    """The live points of `result` replayed in the simulator: `simulated` and `sim_gap_pp`."""
    ran = [p["load"] for p in result["points"]]
    result["simulated"] = {"points": [asdict(p) for p in _simulate(
        policy, served, models, ran, pairs, count_tokens, slo, args, profile)]}
    result["sim_gap_pp"] = max(abs(live["attainment"] - sim["attainment"]) * 100 for live, sim
                               in zip(result["points"], result["simulated"]["points"], strict=True))


def _sim_profile_info(path: Path, profile) -> dict:
    return {"file": str(path), "label": profile.gpu, "serving_overhead": msgspec.to_builtins(profile.serving),
            "step_tables": sorted(profile.step_tables), "kv_swap": sorted(profile.kv_swap),
            "how": "tokenpool sim's Simulation (the live scheduler classes on a simulated clock) replays "
                   "each point's trace with the profile's step, prefill and switch times, its measured "
                   "step tables, KV swap times and serving-path overhead where it has them (the "
                   "schedulers predict with the fitted lines, as live instances do); same instances, "
                   "SLO, drain cut, and decode KV region and host KV pool (preemption and recompute "
                   "when a batch outgrows the region; refused hand-offs and switches when the pool is "
                   "full)"}


def resimulate(args: argparse.Namespace) -> None:
    """No live run: a past report's traces (regenerated from its command's seed and workload)
    replayed with --sim-profile; its live points are kept, its simulated ones replaced."""
    import shlex

    from tokenpool.cli.main import build_parser
    from tokenpool.cli.serve_command import TINY, catalogue

    if args.sim_profile is None:
        raise ValueError("--resimulate needs --sim-profile (the profile to simulate with)")
    try:
        report = json.loads(args.resimulate.read_text())
        live = build_parser().parse_args(shlex.split(report["command"])[1:])
        slo = SLO(ttft_s=report["slo"]["ttft_s"], tbt_s=report["slo"]["tbt_s"])
        policies = {name: (result, result["served_models"]) for name, result in report["policies"].items()}
    except (OSError, ValueError, KeyError, TypeError, SystemExit) as exc:
        raise ValueError(f"--resimulate {args.resimulate}: not a `tokenpool bench serve` report "
                         f"({type(exc).__name__}: {exc})") from None
    models = catalogue(live.model or list(TINY))
    profile = _sim_profile(args.sim_profile, models)
    pairs, count_tokens = _conversations(models)
    for policy, (result, served) in policies.items():
        _add_simulation(result, policy, {m: models[m] for m in served}, models, pairs, count_tokens, slo,
                        live, profile)
        result["_raw"] = []
    report["sim_profile"] = _sim_profile_info(args.sim_profile, profile)
    report["resimulated"] = {"from": str(args.resimulate), "command": args.command_line,
                             "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    _set_goodputs(report["policies"])
    _write(args, report)


def _parse_policies(text: str) -> list[str]:
    policies = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise ValueError(f"--policies {text!r}: expected a comma-separated list from {', '.join(POLICIES)}")
    return policies


def _parse_rates(text: str) -> list[float]:
    try:
        rates = sorted(float(r) for r in text.split(","))
    except ValueError:
        raise ValueError(f"--rates {text!r}: expected comma-separated numbers") from None
    if not rates or rates[0] <= 0:
        raise ValueError(f"--rates {text!r}: every rate must be positive")
    return rates


def _conversations(models: dict[str, Path]):
    from tokenpool.bench.sharegpt import load_pairs
    from tokenpool.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(next(iter(models.values())))
    return load_pairs(), lambda text: len(tokenizer.encode(text))


def _sim_profile(path: Path, models: dict[str, Path]):
    from tokenpool.bench import gpu_profiles

    profile = gpu_profiles.load(path)
    missing = [m for m in models if m not in profile.models]
    if missing:
        raise ValueError(f"--sim-profile {path} lacks {', '.join(missing)}: run `tokenpool profile` with the "
                         "same --model flags and --threads as the instances")
    return profile


def _plan(args, models: dict[str, Path]) -> tuple[str, list[float]]:
    """The sweep's name and its loads: per-model rates, or (--models-sweep) numbers of models."""
    rates = _parse_rates(args.rates)
    if args.models_sweep is None:
        return "rate_per_model", rates
    try:
        counts = sorted({int(n) for n in args.models_sweep.split(",")})
    except ValueError:
        raise ValueError(f"--models-sweep {args.models_sweep!r}: expected comma-separated whole numbers") \
            from None
    if len(rates) != 1:
        raise ValueError(f"--models-sweep runs at one per-model rate; --rates {args.rates!r} names "
                         f"{len(rates)}")
    if not 1 <= counts[0] <= counts[-1] <= len(models):
        raise ValueError(f"--models-sweep {args.models_sweep!r}: each number of models must be 1 to "
                         f"{len(models)} (the --model list)")
    return "models", counts


def _workload(args, models: dict[str, Path], load: float) -> WorkloadConfig:
    """A point's workload: every model at the rate `load`, or the first `load` models at the one rate."""
    sweep, _ = _plan(args, models)
    names, rate = (tuple(models), load) if sweep == "rate_per_model" else \
        (tuple(models)[:int(load)], _parse_rates(args.rates)[0])
    return WorkloadConfig(names, rate, args.duration, args.seed, args.max_prompt_tokens,
                          args.max_output_tokens)


def _describe(sweep: str, load: float) -> str:
    return f"rate {load:g}/s per model" if sweep == "rate_per_model" else \
        f"{load:g} model{'' if load == 1 else 's'}"


def _listed(address: str) -> set[str]:
    """The models a running stack serves (its proxy's ListModels)."""
    import grpc
    from tokenpool.protos.v1 import inference_pb2 as pb
    from tokenpool.protos.v1 import inference_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            listed = inference_pb2_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        except grpc.RpcError as exc:
            raise ValueError(f"--address {address}: no stack answers there ({exc.code().name}: "
                             f"{exc.details()})") from None
    return {m.id for m in listed.models}


def _served(policy: str, models: dict[str, Path], args, listed: set[str] | None = None) -> dict[str, Path]:
    """The models the stack serves (the others' requests score 0): a running stack's (--address),
    else all, but for static only as many as instances of each kind (each pinned, resident)."""
    if listed is not None:
        served = {m: folder for m, folder in models.items() if m in listed}
        if not served:
            raise ValueError(f"--address {args.address} serves none of {', '.join(models)} (it serves "
                             f"{', '.join(sorted(listed)) or 'nothing'}); name its models with --model")
        return served
    if policy != "static":
        return models
    return dict(list(models.items())[:min(args.prefill, args.decode)])


@contextlib.contextmanager
def _stack(policy: str, served: dict[str, Path], slo, args):
    """-> (the address to drive, the SLO): a stack started for the policy (stopped after), or the
    running one at --address (left running)."""
    if args.address is not None:
        print(f"[{policy}] driving the stack at {args.address} ({', '.join(served)})", file=sys.stderr,
              flush=True)
        yield _target(args, args.address, None), slo
        return
    from tokenpool.compose.launcher import Stack, StackConfig

    tbt_ms = slo.tbt_s * 1e3 if slo else None
    config = StackConfig(models=served, prefill=args.prefill, decode=args.decode, port=0, policy=policy,
                         threads=args.threads, tbt_ms=tbt_ms, gateway=args.api == "http", gateway_port=0)
    with tempfile.TemporaryDirectory(prefix="tokenpool-bench-") as logs, Stack(config, Path(logs)) as stack:
        print(f"[{policy}] starting the stack ({', '.join(served)})", file=sys.stderr, flush=True)
        stack.start(progress=lambda line: None)
        yield _target(args, stack.address, stack.gateway_url), slo or _scaled_slo(stack)


def _target(args, address: str, gateway_url: str | None) -> str:
    """What replay drives: the proxy's gRPC address, or (--api http) the gateway's base URL."""
    if args.api == "grpc":
        return address
    return gateway_url or args.gateway_url or f"http://{address.rpartition(':')[0]}:8000/v1"


def _replay(args, target: str, trace: list[TraceRequest], served: set[str], label: str) -> list:
    if args.api == "http":
        from .http_replay import replay_http

        return asyncio.run(replay_http(target, trace, served, args.duration, label, DRAIN_FACTOR))
    return asyncio.run(replay(target, trace, served, args.duration, label))


def _run_policy(policy, served, models, loads, pairs, count_tokens, slo, args):
    sweep, _ = _plan(args, models)
    with _stack(policy, served, slo, args) as (address, slo):
        _warm_up(address, policy, served, pairs, count_tokens, args)
        points, raw = [], []
        for load in loads:
            trace = make_trace(_workload(args, models, load), pairs, count_tokens)
            results = _replay(args, address, trace, set(served), f"[{policy}] {load:g}")
            key = "rate" if sweep == "rate_per_model" else "models"
            raw.extend({"policy": policy, key: load, "request_id": r.request_id, "model": r.model,
                        "arrival_s": res.arrival_s, "token_times": res.token_times, "finished": res.finished}
                       for r, res in zip(trace, results, strict=True))
            point = summarize(load, results, slo)
            print(f"[{policy}] {_describe(sweep, load)}: attainment {point.attainment:.1%}, "
                  f"TTFT p50 {point.ttft_p50:.2f} s, TBT p50 {point.tbt_p50 * 1e3:.0f} ms", file=sys.stderr)
            points.append(point)
            if point.attainment < args.stop_below:
                break
    result = {"points": [asdict(p) for p in points], "served_models": list(served), "_raw": raw}
    if len(points) < len(loads):
        result["skipped_loads"] = loads[len(points):]
        skipped = ", ".join(f"{x:g}" for x in result["skipped_loads"])
        print(f"[{policy}] below {args.stop_below:.0%}: skipping {skipped}", file=sys.stderr, flush=True)
    return result, slo


def _warm_up(address: str, policy: str, served: dict[str, Path], pairs, count_tokens, args) -> None:
    """One request per served model, one after another, before the first rate, not scored. A
    fresh stack's first request of a model pays once for what no later one does (the model's
    first copy into each instance's arena slot, its KV region's first pages, the first runs of
    its kernels' shapes): up to a second or two per model, which would otherwise land on the
    first rate only, and which the simulator, like a server that has been up for a while, does
    not model."""
    fits = min(args.max_prompt_tokens, WARMUP_PROMPT_TOKENS)
    prompt = next((p.prompt for p in pairs if count_tokens(p.prompt) <= fits), None)
    if prompt is None:
        raise ValueError(f"no conversation's prompt fits in {fits} tokens, for the warm-up")
    for model in served:
        request = TraceRequest(0.0, model, prompt, args.max_output_tokens, f"warmup-{model}")
        started = time.monotonic()
        (result,) = _replay(args, address, [request], {model}, f"[{policy}] warm-up")
        if not result.finished:
            raise RuntimeError(f"[{policy}] the warm-up request for {model} did not finish; see the "
                               "instances' logs")
        print(f"[{policy}] warm-up: {model} answered {len(result.token_times)} tokens in "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def _simulate(policy, served, models, loads, pairs, count_tokens, slo, args, profile) -> list[LoadPoint]:
    """The live sweep again in the simulator: same traces, instance counts, TBT target and drain cut."""
    from tokenpool.bench.simulator import SimConfig, Simulation
    from tokenpool.compose.launcher import StackConfig
    from tokenpool.engine.model_config import ModelConfig
    from tokenpool.engine.tokenizer import Tokenizer

    tokenizers = {m: Tokenizer.from_folder(folder) for m, folder in served.items()}
    contexts = {m: ModelConfig.from_folder(folder).max_position_embeddings for m, folder in served.items()}
    timings = profile.timings({m: m for m in served})
    cut = args.duration * (1 + DRAIN_FACTOR)
    sweep, points = _plan(args, models)[0], []
    for load in loads:
        trace = make_trace(_workload(args, models, load), pairs, count_tokens)
        requests = {r.request_id: sim for r in trace if r.model in served
                    for sim in [sim_request(r, len(tokenizers[r.model].encode(r.prompt)), contexts[r.model])]
                    if sim is not None}
        stack = StackConfig(models=served)  # the KV sizes of the stacks bench serve starts: the defaults
        config = SimConfig(policy, args.prefill, args.decode, slo.tbt_s, decode_kv_bytes=stack.kv_mib << 20,
                           decode_host_kv_bytes=stack.host_kv_mib << 20)
        sim = Simulation(config, timings, list(served))
        sim.run(list(requests.values()))
        results = []
        for r in trace:
            seq = requests.get(r.request_id)
            times = [t for t in seq.token_times if t <= cut] if seq else []
            finished = seq is not None and len(times) == seq.max_tokens
            results.append(RequestResult(r.arrival_s, times, finished))
        points.append(summarize(load, results, slo))
        print(f"[{policy}] simulated {_describe(sweep, load)}: attainment {points[-1].attainment:.1%}",
              file=sys.stderr, flush=True)
    return points


def sim_request(request: TraceRequest, prompt_len: int, context: int):
    """The request as the simulator runs it, judged as the live engine judges it: None if its
    prompt leaves no room in the model's context (live refuses it: it scores 0), and its output
    cut where the context ends (live stops there and calls it finished)."""
    from tokenpool.bench.simulator import SimRequest

    if prompt_len >= context:
        return None
    return SimRequest(request.request_id, request.model, request.arrival_s, prompt_len,
                      min(request.max_tokens, context - prompt_len))


def _scaled_slo(stack) -> SLO:
    import grpc
    from tokenpool.protos.internal.v1 import instances_pb2 as ipb
    from tokenpool.protos.internal.v1 import instances_pb2_grpc

    decode = next(s for s in stack.services if s.name.startswith("decode"))
    with grpc.insecure_channel(decode.address) as channel:
        status = instances_pb2_grpc.DecodeStub(channel).Status(ipb.StatusRequest(), timeout=30)
    if not status.tbt_target_s:
        raise RuntimeError("the decode instance reports no TBT target (start the first policy as aegaeon)")
    return SLO(ttft_s=TTFT_PER_TBT * status.tbt_target_s, tbt_s=status.tbt_target_s)


async def replay(address: str, trace: list[TraceRequest], served: set[str], duration: float,
                 label: str) -> list[RequestResult]:
    """The trace over the gRPC API (bench/open_loop.py: arrivals, scoring, progress)."""
    import grpc
    from tokenpool.protos.v1 import inference_pb2 as pb
    from tokenpool.protos.v1 import inference_pb2_grpc

    from .open_loop import open_loop

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def stream(request: TraceRequest, timeout: float, now) -> tuple[list[float], bool]:
            sampling = pb.SamplingParams(max_tokens=request.max_tokens, ignore_eos=True)
            message = pb.GenerateRequest(model=request.model, text=request.prompt,
                                         request_id=request.request_id, sampling=sampling)
            times: list[float] = []
            finished = False
            try:
                async for response in stub.Generate(message, timeout=timeout):
                    times += [now()] * len(response.token_ids)
                    finished = response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            except grpc.aio.AioRpcError:
                finished = False
            return times, finished

        return await open_loop(trace, served, duration, DRAIN_FACTOR, label, stream)


def _set_goodputs(policies: dict[str, dict]) -> None:
    """Each policy's goodput (live, and simulated if it was); a sweep below 90% even at the lowest
    rate gets 0 and a note (static serving few models does). ValueError, before anything is
    written, if no policy reaches 90% live."""
    notes = []
    for policy, result in policies.items():
        for part in [result, result.get("simulated")]:
            if part is None:
                continue
            try:
                part["goodput"] = goodput([LoadPoint(**p) for p in part["points"]])
            except ValueError as exc:
                part["goodput"], part["note"] = 0.0, str(exc)
                if part is result:
                    notes.append(f"{policy}: {exc}")
    if len(notes) == len(policies):
        raise ValueError(f"the sweep never reaches 90% attainment ({'; '.join(notes)}); lower the load "
                         "(--rates, --models-sweep; no result files were written)")


def machine() -> str:
    """The machine a result was measured on, in one line."""
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def _write(args, report: dict) -> None:
    """JSON and PNG (and the raw JSONL if asked), all or none."""
    raw = [record for result in report["policies"].values() for record in result.pop("_raw")]
    plot = args.plot or args.json.with_suffix(".png")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.json.with_name(args.json.name + ".tmp")
    tmp_json.write_text(json.dumps(report, indent=2) + "\n")
    tmp_raw = args.raw.with_name(args.raw.name + ".tmp") if args.raw else None
    try:
        if tmp_raw is not None:
            tmp_raw.write_text("".join(json.dumps(r) + "\n" for r in raw))
        _plot(report, plot)
    except BaseException:
        tmp_json.unlink(missing_ok=True)
        if tmp_raw is not None:
            tmp_raw.unlink(missing_ok=True)
        raise
    tmp_json.replace(args.json)
    if tmp_raw is not None:
        tmp_raw.replace(args.raw)
    print_table(report)
    print(f"wrote {args.json} and {plot}")


def _plot(report: dict, path: Path) -> None:
    from tokenpool.bench.plots import Curve, plot_attainment

    unit = "/s" if report["sweep"] == "rate_per_model" else " models"
    curves = []
    for policy, result in report["policies"].items():
        label = f"{policy} (goodput {result['goodput']:g}{unit})"
        curves.append(Curve(label, [p["load"] for p in result["points"]],
                            [p["attainment"] for p in result["points"]]))
        if "simulated" in result:
            sim = result["simulated"]["points"]
            curves.append(Curve(f"{policy}, simulated (gap {result['sim_gap_pp']:.1f} pp)",
                                [p["load"] for p in sim], [p["attainment"] for p in sim], dashed_after=label))
    title = f"{len(report['models'])} models" if report["sweep"] == "rate_per_model" else \
        f"{report['rate_per_model']:g} req/s per model"
    plot_attainment(curves, report["sweep"], f"{title}, TTFT {report['slo']['ttft_s']:.1f} s, "
                    f"TBT {report['slo']['tbt_s'] * 1e3:.0f} ms", path)


def print_table(report: dict) -> None:
    print(f"\nSLO: TTFT {report['slo']['ttft_s']:.2f} s, TBT {report['slo']['tbt_s'] * 1e3:.1f} ms")
    rates = report["sweep"] == "rate_per_model"
    head = ("policy", "rate/s" if rates else "models", "attain", "TTFT p50", "TTFT p99", "TBT p50", "TBT p99")
    print("".join(f"{h:>10}" for h in head))
    for policy, result in report["policies"].items():
        for p in result["points"]:
            cells = (policy, f"{p['load']:g}", f"{p['attainment']:.1%}", f"{p['ttft_p50']:.2f}",
                     f"{p['ttft_p99']:.2f}", f"{p['tbt_p50'] * 1e3:.0f}", f"{p['tbt_p99'] * 1e3:.0f}")
            print("".join(f"{c:>10}" for c in cells))
        served = ", ".join(result["served_models"])
        print(f"{policy:>10} goodput {result['goodput']:g} {'req/s per model' if rates else 'models'}; "
              f"serves {served}")
        if "simulated" in result:
            cells = ", ".join(f"{p['load']:g}: {p['attainment']:.1%}" for p in result["simulated"]["points"])
            print(f"{'':>10} simulated {cells} (largest gap to live {result['sim_gap_pp']:.1f} pp, "
                  f"goodput {result['simulated']['goodput']:g})")
        if "note" in result:
            print(f"{'':>10} {result['note']}")
        skipped = result.get("skipped_loads", result.get("skipped_rates"))  # the key before --models-sweep
        if skipped:
            skipped = ", ".join(f"{x:g}" for x in skipped)
            print(f"{'':>10} not run (a lower load fell below --stop-below): {skipped}")
