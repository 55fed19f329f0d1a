"""`tokenpool bench tracing`: what tracing costs a live stack, as throughput with it on and off.

Rounds alternate: a stack with tracing off (no OTEL_* variables: nothing installed), then
the same stack with every service exporting to an OTLP receiver in this process (it only
counts spans), each driven by the same closed-loop workload: CONCURRENCY clients sending
requests over the models in turn, `--requests` in all, `--max-tokens` each. Throughput is
output tokens per second of wall time; the overhead is 1 - on/off of the per-mode medians
over rounds (alternating keeps slow drift of a shared machine out of the ratio).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

CONCURRENCY = 8
PROMPT = "Tell me about the weather in the mountains in spring, and what to pack."
OVERHEAD_TARGET = 0.02


def add_parser(commands) -> None:
    p = commands.add_parser("tracing", help="throughput of a live stack with tracing on and off")
    p.add_argument("--model", action="append", default=[], metavar="ID[=FOLDER]",
                   help="a model to serve (repeatable; default: the four tiny models)")
    p.add_argument("--requests", type=int, default=160, help="requests per run")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="off/on pairs")
    p.add_argument("--threads", type=int, default=1, help="per instance")
    p.add_argument("--json", type=Path, required=True)
    p.set_defaults(run=run)


class _SpanCounter:
    """An OTLP TraceService that counts the spans exported to it, per service."""

    def __init__(self) -> None:
        self.by_service: dict[str, int] = {}
        self._lock = threading.Lock()

    def Export(self, request, context):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        with self._lock:
            for resource_spans in request.resource_spans:
                name = next((a.value.string_value for a in resource_spans.resource.attributes
                             if a.key == "service.name"), "?")
                count = sum(len(scope.spans) for scope in resource_spans.scope_spans)
                self.by_service[name] = self.by_service.get(name, 0) + count
        return trace_service_pb2.ExportTraceServiceResponse()

    def total(self) -> int:
        with self._lock:
            return sum(self.by_service.values())


def run(args) -> None:
    from tokenpool.bench.serve_bench import machine
    from tokenpool.cli.serve_command import TINY, catalogue

    for name in ("requests", "max_tokens", "rounds", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    models = catalogue(args.model or list(TINY))
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]  # "off" must mean off: the services inherit this environment
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "1000"  # read by the traced services only
    try:
        report = _measure(models, args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    report.update(command=args.command_line, machine=machine(),
                  date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.json)
    print(f"{'tracing':>8}{'tok/s (median)':>16}{'runs':>8}")
    for mode, value in (("off", report["off_tokens_per_s"]), ("on", report["on_tokens_per_s"])):
        print(f"{mode:>8}{value:>16.1f}{args.rounds:>8}")
    print(f"overhead {report['overhead']:.1%} of throughput (target < {OVERHEAD_TARGET:.0%})")
    print(f"wrote {args.json}")


def _measure(models: dict[str, Path], args) -> dict:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    counter = _SpanCounter()
    receiver = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    runs = []
    try:
        for round_ in range(args.rounds):
            for mode in ("off", "on"):
                endpoint = f"http://127.0.0.1:{port}" if mode == "on" else None
                before = counter.total()
                tokens, seconds = _one_run(models, endpoint, args)
                time.sleep(1.5 if mode == "on" else 0)  # the last spans' export
                spans = counter.total() - before
                runs.append({"round": round_, "tracing": mode, "tokens": tokens, "seconds": seconds,
                             "tokens_per_s": tokens / seconds, "spans": spans})
                print(f"round {round_ + 1}/{args.rounds}, tracing {mode}: {tokens / seconds:.1f} tok/s, "
                      f"{spans} spans", file=sys.stderr, flush=True)
    finally:
        receiver.stop(None)
    if not any(r["spans"] for r in runs if r["tracing"] == "on"):
        raise RuntimeError("tracing on exported no spans: the measurement would be of nothing")
    off = statistics.median(r["tokens_per_s"] for r in runs if r["tracing"] == "off")
    on = statistics.median(r["tokens_per_s"] for r in runs if r["tracing"] == "on")
    return {"models": list(models), "requests": args.requests, "max_tokens": args.max_tokens,
            "concurrency": CONCURRENCY, "off_tokens_per_s": off, "on_tokens_per_s": on,
            "overhead": 1 - on / off, "target": OVERHEAD_TARGET, "spans_by_service": counter.by_service,
            "runs": runs}


def _one_run(models: dict[str, Path], trace_endpoint: str | None, args) -> tuple[int, float]:
    from tokenpool.compose.launcher import Stack, StackConfig

    config = StackConfig(models=models, prefill=1, decode=1, port=0, threads=args.threads,
                         trace_endpoint=trace_endpoint)
    with tempfile.TemporaryDirectory(prefix="tokenpool-bench-") as logs, Stack(config, Path(logs)) as stack:
        stack.start(progress=lambda line: None)
        return asyncio.run(_closed_loop(stack.address, list(models), args.requests, args.max_tokens))


async def _closed_loop(address: str, models: list[str], requests: int, max_tokens: int) -> tuple[int, float]:
    import grpc
    from tokenpool.protos.v1 import inference_pb2 as pb
    from tokenpool.protos.v1 import inference_pb2_grpc

    next_index, tokens = iter(range(requests)), [0]

    async def client(stub) -> None:
        for i in next_index:
            sampling = pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            request = pb.GenerateRequest(model=models[i % len(models)], text=PROMPT, sampling=sampling)
            async for response in stub.Generate(request, timeout=300):
                tokens[0] += len(response.token_ids)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        start = time.perf_counter()
        await asyncio.gather(*(client(stub) for _ in range(CONCURRENCY)))
        return tokens[0], time.perf_counter() - start
