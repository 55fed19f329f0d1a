"""What the serving path adds to the engine's times, measured through a live stack.

`tokenpool profile` fits the engine's own step and prefill times; a request served by a
stack also pays the proxy, the RPCs, the KV hand-off and one streamed response per token,
and on a CPU machine the instances share cores with each other, the proxy and the client.
`tokenpool profile --serving` starts a stack (1 prefill + 1 decode instance, one model,
the instances' threads) and measures, against the model's profile:

    decode step  = profile step + step_s + token_s * batch      (batches of 1, 2, 4, 8 streams)
                   + corun_step_s while a prefill instance computes (a client keeps it busy)
    first token  = profile prefill + request_s                  (one request at a time)

A step is a stream's mean token gap while every stream of its batch is decoding (after the
last one's first token, up to the first one's last), the median over streams and repeats.
The simulator adds these to its clock (ServingOverhead); schedulers never see them.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenpool.engine.step_time_model import ServingOverhead, TimingProfile

BATCHES = (1, 2, 4, 8)
CORUN_BATCHES = (1, 4)
REPEATS = 6
OUTPUT_TOKENS = 64
PROMPT = ("A platform team runs hundreds of language models for its users, most of them asked for "
          "only now and then, on a small shared pool of accelerators. ")
BACKGROUND_PROMPT_REPEATS = 4  # the co-run client's prompts: this many copies of PROMPT, one token out
MIN_TOKENS = 8  # a stream with fewer tokens in its batch's window is not a measurement


@dataclass
class BatchSample:
    batch: int
    corun: bool
    step_s: float  # median over streams of the mean token gap while all `batch` streams decode
    predicted_s: float  # the profile's step at that batch and context

    @property
    def extra_s(self) -> float:
        return self.step_s - self.predicted_s


@dataclass
class ServingMeasurement:
    overhead: ServingOverhead
    model: str
    prompt_tokens: int
    ttft_s: float  # median, one request at a time
    predicted_prefill_s: float
    samples: list[BatchSample]

    def to_json(self) -> dict:
        return {"model": self.model, "prompt_tokens": self.prompt_tokens, "output_tokens": OUTPUT_TOKENS,
                "repeats": REPEATS, "ttft_s": self.ttft_s, "predicted_prefill_s": self.predicted_prefill_s,
                "steps": [{"batch": s.batch, "corun": s.corun, "step_s": s.step_s,
                           "predicted_s": s.predicted_s} for s in self.samples]}


def fit_overhead(samples: list[BatchSample], request_s: float) -> ServingOverhead:
    """step_s + token_s * batch by least squares over the samples without co-run (both >= 0), and
    corun_step_s as the median of what the co-run samples add beyond that line."""
    alone = [s for s in samples if not s.corun]
    if len({s.batch for s in alone}) < 2:
        raise ValueError("need step samples at two or more batch sizes without co-run")
    x = np.array([s.batch for s in alone], dtype=np.float64)
    y = np.array([s.extra_s for s in alone], dtype=np.float64)
    token_s, step_s = np.polyfit(x, y, 1)
    if token_s < 0:
        token_s, step_s = 0.0, max(0.0, float(np.mean(y)))
    elif step_s < 0:
        step_s, token_s = 0.0, max(0.0, float(np.dot(x, y) / np.dot(x, x)))
    line = ServingOverhead(step_s=float(step_s), token_s=float(token_s))
    corun = [s.extra_s - line.decode_extra(s.batch, False) for s in samples if s.corun]
    corun_s = max(0.0, statistics.median(corun)) if corun else 0.0
    return ServingOverhead(request_s=max(0.0, request_s), step_s=line.step_s, token_s=line.token_s,
                           corun_step_s=corun_s)


def batch_window_steps(streams: list[tuple[float, list[float]]]) -> list[float]:
    """Each stream's mean token gap inside the window where all of them decode (after the last
    first token, up to the first last token): span over tokens, so tokens that arrive together
    in one response still count. streams: (start, token arrival times) each."""
    start = max(times[0] for _, times in streams)
    end = min(times[-1] for _, times in streams)
    steps = []
    for _, times in streams:
        inside = [t for t in times if start <= t <= end]
        if len(inside) >= MIN_TOKENS and inside[-1] > inside[0]:
            steps.append((inside[-1] - inside[0]) / (len(inside) - 1))
    return steps


def measure(folders: dict[str, Path], model: str, profile: TimingProfile, threads: int | None,
            progress=lambda line: print(line, file=sys.stderr, flush=True)) -> ServingMeasurement:
    """Start a stack serving every model of `folders` (as a live run would) and measure the
    serving overhead of requests for `model` against its `profile`."""
    from tokenpool.compose.launcher import Stack, StackConfig
    from tokenpool.engine.tokenizer import Tokenizer

    prompt_tokens = len(Tokenizer.from_folder(folders[model]).encode(PROMPT))
    config = StackConfig(models=folders, prefill=1, decode=1, port=0, policy="aegaeon", threads=threads)
    with tempfile.TemporaryDirectory(prefix="tokenpool-serving-") as logs, Stack(config, Path(logs)) as stack:
        progress(f"serving overhead: starting a stack with {len(folders)} models, requests for {model}")
        stack.start(progress=lambda line: None)
        ttfts, samples = asyncio.run(_measure(stack.address, model, prompt_tokens, profile, progress))
    ttft = statistics.median(ttfts)
    predicted_prefill = profile.prefill.predict(prompt_tokens)
    overhead = fit_overhead(samples, ttft - predicted_prefill)
    return ServingMeasurement(overhead, model, prompt_tokens, ttft, predicted_prefill, samples)


async def _measure(address: str, model: str, prompt_tokens: int, profile: TimingProfile, progress):
    import grpc
    from tokenpool.protos.v1 import inference_pb2 as pb
    from tokenpool.protos.v1 import inference_pb2_grpc

    counter = iter(range(1 << 30))

    async def stream(stub, text: str, max_tokens: int) -> tuple[float, list[float]]:
        start, times = time.monotonic(), []
        request = pb.GenerateRequest(model=model, text=text, request_id=f"serving-{next(counter)}",
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        async for response in stub.Generate(request, timeout=300):
            times += [time.monotonic()] * len(response.token_ids)
        if len(times) != max_tokens:
            raise RuntimeError(f"serving overhead: {model} returned {len(times)} of {max_tokens} tokens")
        return start, times

    async def batch_step(stub, batch: int, corun: bool) -> BatchSample:
        steps = []
        for _ in range(REPEATS):
            streams = await asyncio.gather(*(stream(stub, PROMPT, OUTPUT_TOKENS) for _ in range(batch)))
            steps += batch_window_steps(streams)
        if not steps:
            raise RuntimeError(f"serving overhead: batches of {batch} never decoded together for "
                               f"{MIN_TOKENS} tokens; is {model}'s prefill much slower than its decode?")
        context = batch * (prompt_tokens + OUTPUT_TOKENS // 2)
        sample = BatchSample(batch, corun, statistics.median(steps), profile.decode.predict(context, batch))
        progress(f"serving overhead: batch {batch}{' with prefills running' if corun else ''}: step "
                 f"{sample.step_s * 1e3:.2f} ms, profile {sample.predicted_s * 1e3:.2f} ms")
        return sample

    async def keep_prefilling(stub, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await stream(stub, PROMPT * BACKGROUND_PROMPT_REPEATS, 1)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await stream(stub, PROMPT, OUTPUT_TOKENS)  # warm-up: first-request costs are not overhead
        ttfts = []
        for _ in range(2 * REPEATS):
            start, times = await stream(stub, PROMPT, 2)
            ttfts.append(times[0] - start)
        progress(f"serving overhead: first token {statistics.median(ttfts) * 1e3:.1f} ms, profile prefill "
                 f"{profile.prefill.predict(prompt_tokens) * 1e3:.1f} ms")
        samples = [await batch_step(stub, batch, False) for batch in BATCHES]
        stop = asyncio.Event()
        background = [asyncio.create_task(keep_prefilling(stub, stop)) for _ in range(2)]
        try:
            await asyncio.sleep(0.5)
            samples += [await batch_step(stub, batch, True) for batch in CORUN_BATCHES]
        finally:
            stop.set()
            await asyncio.gather(*background)
    return ttfts, samples
