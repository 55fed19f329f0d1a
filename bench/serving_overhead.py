"""What the serving path adds to the engine's times, measured through a live stack.

`tokenpool profile` fits the engine's own step and prefill times; a request served by a
stack also pays the proxy, the RPCs, the KV hand-off and one streamed response per token,
and on a CPU machine the instances share cores with each other, the proxy and the client.
`tokenpool profile --live-clock` starts a stack (1 prefill + 1 decode instance serving the
profiled models, the instances' threads) and measures requests for the smallest model
against what the simulator's clock takes for it (its step table, else its profile's line),
and prefills of the largest (long enough to time) with and without decoding beside them:

    decode step  = clock step + step_s + token_s * batch        (batches of 1, 2, 4, 8 streams)
                   + corun_step_s while a prefill instance computes (clients keep it busy)
    first token  = profile prefill + request_s                  (one request at a time)
    prefill      x corun_prefill_factor while the decode instance has work
    decode step  x corun_decode_factor (of the largest model's) while a prefill computes

A step is a stream's mean token gap while every stream of its batch is decoding (after the
last one's first token, up to the first one's last), the median over streams and repeats.
The simulator adds these to its clock (ServingOverhead); schedulers never see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenpool.engine.step_time_model import ServingOverhead, TimingProfile

BATCHES = (1, 2, 4, 8)
CORUN_BATCHES = (1, 4)
REPEATS = 6
OUTPUT_TOKENS = 64
MAX_OUTPUT_GROWTH = 8  # batch_step's streams grow to at most this many times OUTPUT_TOKENS
PROMPT = ("A platform team runs hundreds of language models for its users, most of them asked for "
          "only now and then, on a small shared pool of accelerators. ")
LONG_PROMPT_REPEATS = 4  # prefills timed, and the prefill background's: this many copies of PROMPT
PREFILL_REPEATS = 4
LARGE_BATCH, LARGE_REPEATS, LARGE_OUTPUT_TOKENS = 2, 2, 32  # the large model's decode, alone and co-run
BACKGROUND_CLIENTS = 2
BACKGROUND_MARGIN = 4  # the decode background is sized to this many times the prefills' time alone
MIN_TOKENS = 8  # a stream with fewer tokens in its batch's window is not a measurement


@dataclass
class BatchSample:
    batch: int
    corun: bool
    step_s: float  # median over streams of the mean token gap while all `batch` streams decode
    predicted_s: float  # the clock's step at that batch and context

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
    prefill_model: str
    prefill_tokens: int
    prefill_s: tuple[float, float]  # median first token of prefill_model: alone, while its decode runs
    large_steps: tuple[float, float]  # prefill_model's decode step at LARGE_BATCH: alone, while prefills run

    def to_json(self) -> dict:
        return {"model": self.model, "prompt_tokens": self.prompt_tokens, "output_tokens": OUTPUT_TOKENS,
                "repeats": REPEATS, "ttft_s": self.ttft_s, "predicted_prefill_s": self.predicted_prefill_s,
                "steps": [{"batch": s.batch, "corun": s.corun, "step_s": s.step_s,
                           "predicted_s": s.predicted_s} for s in self.samples],
                "prefill": {"model": self.prefill_model, "prompt_tokens": self.prefill_tokens,
                            "repeats": PREFILL_REPEATS, "alone_s": self.prefill_s[0],
                            "with_decode_s": self.prefill_s[1]},
                "large_decode": {"model": self.prefill_model, "batch": LARGE_BATCH, "repeats": LARGE_REPEATS,
                                 "output_tokens": LARGE_OUTPUT_TOKENS, "alone_s": self.large_steps[0],
                                 "with_prefills_s": self.large_steps[1]}}


def fit_overhead(samples: list[BatchSample], request_s: float, corun_prefill_factor: float = 1.0,
                 corun_decode_factor: float = 1.0) -> ServingOverhead:
    """step_s + token_s * batch by least squares over the samples without co-run (both >= 0), and
    corun_step_s as the median of what the co-run samples add beyond that line and the factor
    (measured on the large model)."""
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
    line = ServingOverhead(step_s=float(step_s), token_s=float(token_s),
                           corun_decode_factor=max(1.0, corun_decode_factor))
    corun = [s.step_s - line.decode_step(s.predicted_s, s.batch, True) for s in samples if s.corun]
    corun_s = max(0.0, statistics.median(corun)) if corun else 0.0
    return ServingOverhead(request_s=max(0.0, request_s), step_s=line.step_s, token_s=line.token_s,
                           corun_step_s=corun_s, corun_prefill_factor=max(1.0, corun_prefill_factor),
                           corun_decode_factor=line.corun_decode_factor)


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


def measure(folders: dict[str, Path], profiles: dict[str, TimingProfile], threads: int | None,
            step: Callable[[str, int, int], float] | None = None,
            progress=lambda line: print(line, file=sys.stderr, flush=True)) -> ServingMeasurement:
    """Start a stack serving every model of `folders` (as a live run would) and measure the
    serving overhead: decode with requests for the smallest model, against `step` (model,
    sum_seq_len, batch_size -> seconds; default the profile's line); prefill co-run with the
    largest, whose prefills are long enough to time."""
    from tokenpool.compose.launcher import Stack, StackConfig
    from tokenpool.engine.model_config import ModelConfig
    from tokenpool.engine.tokenizer import Tokenizer

    small = min(folders, key=lambda m: profiles[m].weight_bytes)
    large = max(folders, key=lambda m: profiles[m].weight_bytes)
    tokenizers = {m: Tokenizer.from_folder(folders[m]) for m in {small, large}}
    tokens = {m: len(tokenizer.encode(PROMPT)) for m, tokenizer in tokenizers.items()}
    long_tokens = len(tokenizers[large].encode(PROMPT * LONG_PROMPT_REPEATS))
    # the longest completion each model's context holds after PROMPT (a stream asked for more ends short)
    room = {m: ModelConfig.from_folder(folders[m]).max_position_embeddings - tokens[m] - 1 for m in tokens}
    step = step or (lambda model, sum_len, batch: profiles[model].decode.predict(sum_len, batch))
    config = StackConfig(models=folders, prefill=1, decode=1, port=0, policy="aegaeon", threads=threads)
    with tempfile.TemporaryDirectory(prefix="tokenpool-serving-") as logs, Stack(config, Path(logs)) as stack:
        progress(f"serving overhead: starting a stack with {len(folders)} models")
        stack.start(progress=lambda line: None)
        client = _Client(stack.address, room)
        ttfts, samples, prefill_s, large_steps = asyncio.run(client.run(
            small, tokens[small], lambda sum_len, batch: step(small, sum_len, batch), large, tokens[large],
            lambda sum_len, batch: step(large, sum_len, batch), room[large], progress))
    ttft = statistics.median(ttfts)
    predicted_prefill = profiles[small].prefill.predict(tokens[small])
    request_s = max(0.0, ttft - predicted_prefill)
    alone, corun = (max(1e-9, p - request_s) for p in prefill_s)
    overhead = fit_overhead(samples, request_s, corun_prefill_factor=corun / alone,
                            corun_decode_factor=large_steps[1] / large_steps[0])
    return ServingMeasurement(overhead, small, tokens[small], ttft, predicted_prefill, samples,
                              large, long_tokens, prefill_s, large_steps)


class _Client:
    """Requests to the stack's proxy, timed token by token."""

    def __init__(self, address: str, room: dict[str, int]) -> None:
        """room: model -> the most tokens a completion of PROMPT may ask for (its context's)."""
        self.address = address
        self.room = room
        self.counter = iter(range(1 << 30))

    async def stream(self, model: str, text: str, max_tokens: int,
                     first: asyncio.Event | None = None) -> tuple[float, list[float]]:
        """-> (start, arrival time of each token); `first` is set at the first token."""
        from tokenpool.protos.v1 import inference_pb2 as pb

        start, times = time.monotonic(), []
        request = pb.GenerateRequest(model=model, text=text, request_id=f"serving-{next(self.counter)}",
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        async for response in self.stub.Generate(request, timeout=300):
            times += [time.monotonic()] * len(response.token_ids)
            if first is not None:
                first.set()
        if len(times) != max_tokens:
            raise RuntimeError(f"serving overhead: {model} returned {len(times)} of {max_tokens} tokens")
        return start, times

    async def first_tokens(self, model: str, text: str, count: int) -> float:
        """Median seconds to the first token of `count` requests sent one after another."""
        ttfts = []
        for _ in range(count):
            start, times = await self.stream(model, text, 1)
            ttfts.append(times[0] - start)
        return statistics.median(ttfts)

    async def first_tokens_beside_decode(self, model: str, text: str, count: int, decode_tokens: int,
                                         decode_limit: int) -> float:
        """Median seconds to the first token of `count` requests sent one after another, each
        answered wholly while BACKGROUND_CLIENTS streams of `model` decode (requests of
        `decode_tokens`, cancelled after); a background that ends sooner is replaced, and its
        last prefill not counted. A background that ended before one prefill was timed (its
        steps faster, or the prefill slower, than the sizing assumed: a busy core) doubles the
        streams' length for the next, up to decode_limit; one that fails at that length ends it."""
        ttfts = []
        while len(ttfts) < count:
            timed = len(ttfts)
            async with self._background(model, PROMPT, decode_tokens, repeat=False) as decoding:
                while len(ttfts) < count and decoding():
                    ttft = await self.first_tokens(model, text, 1)
                    if decoding():
                        ttfts.append(ttft)
            if len(ttfts) == timed:
                if decode_tokens >= decode_limit:
                    raise RuntimeError(f"serving overhead: {model}'s background decode of {decode_tokens} "
                                       "tokens ended before one prefill beside it was timed")
                decode_tokens = min(2 * decode_tokens, decode_limit)
        return statistics.median(ttfts)

    async def batch_step(self, model: str, prompt_tokens: int, batch: int, corun: bool, step,
                         repeats: int = REPEATS, output_tokens: int = OUTPUT_TOKENS) -> BatchSample:
        """The batch's median step while all `batch` streams decode, over `repeats` batches that
        did. A batch whose streams never decoded together (one ended before the last got its
        first token: prefills slow beside fast decode steps, or a busy core) is not counted and
        doubles the streams' length for the next, up to MAX_OUTPUT_GROWTH times; one that fails
        at that length ends the measurement. The predicted step uses the mean length of the
        batches counted."""
        longest = min(output_tokens * MAX_OUTPUT_GROWTH, self.room[model])
        steps, lengths, output_tokens = [], [], min(output_tokens, longest)
        while len(lengths) < repeats:
            streams = await asyncio.gather(*(self.stream(model, PROMPT, output_tokens) for _ in range(batch)))
            window = batch_window_steps(streams)
            if window:
                steps += window
                lengths.append(output_tokens)
            elif output_tokens < longest:
                output_tokens = min(2 * output_tokens, longest)
            else:
                break
        if not steps:
            raise RuntimeError(f"serving overhead: batches of {batch} never decoded together for "
                               f"{MIN_TOKENS} tokens, with streams of up to {output_tokens}; is {model}'s "
                               f"prefill much slower than its decode?")
        context = batch * (prompt_tokens + round(statistics.mean(lengths) / 2))
        return BatchSample(batch, corun, statistics.median(steps), step(context, batch))

    async def run(self, small: str, small_tokens: int, step, large: str, large_tokens: int, large_step,
                  decode_limit: int, progress):
        """-> (first-token seconds of `small`, its step samples, (prefill of `large` alone, while
        its decode runs), (step of `large` alone, while its prefills run)); decode_limit: the
        longest request of `large` its context holds after PROMPT."""
        import grpc
        from tokenpool.protos.v1 import inference_pb2_grpc

        long_prompt = PROMPT * LONG_PROMPT_REPEATS
        async with grpc.aio.insecure_channel(self.address) as channel:
            self.stub = inference_pb2_grpc.InferenceStub(channel)
            for model in dict.fromkeys((small, large)):  # warm-up: first-request costs are not overhead
                await self.stream(model, PROMPT, 4)
            ttfts = [await self.first_tokens(small, PROMPT, 1) for _ in range(2 * REPEATS)]
            progress(f"serving overhead: first token of {small} {statistics.median(ttfts) * 1e3:.1f} ms")
            samples = [await self.batch_step(small, small_tokens, b, False, step) for b in BATCHES]
            async with self._background(large, long_prompt, 1, repeat=True):
                samples += [await self.batch_step(small, small_tokens, b, True, step) for b in CORUN_BATCHES]
            large_steps = [await self.batch_step(large, large_tokens, LARGE_BATCH, False, large_step,
                                                 LARGE_REPEATS, LARGE_OUTPUT_TOKENS)]
            async with self._background(large, long_prompt, 1, repeat=True):
                large_steps.append(await self.batch_step(large, large_tokens, LARGE_BATCH, True, large_step,
                                                         LARGE_REPEATS, LARGE_OUTPUT_TOKENS))
            for sample in samples + large_steps:
                beside = " with prefills running" if sample.corun else ""
                name = large if sample in large_steps else small
                progress(f"serving overhead: {name} batch {sample.batch}{beside}: step "
                         f"{sample.step_s * 1e3:.2f} ms, clock {sample.predicted_s * 1e3:.2f} ms")
            alone = await self.first_tokens(large, long_prompt, PREFILL_REPEATS)
            # sized from this run's own times (a prefill beside a decode is slower than alone;
            # the background decodes BACKGROUND_CLIENTS streams, about LARGE_BATCH's step)
            busy_s = BACKGROUND_MARGIN * PREFILL_REPEATS * alone
            decode_tokens = min(int(busy_s / large_steps[0].step_s) + OUTPUT_TOKENS, decode_limit)
            corun = await self.first_tokens_beside_decode(large, long_prompt, PREFILL_REPEATS, decode_tokens,
                                                           decode_limit)
            progress(f"serving overhead: {large}'s prefill of {LONG_PROMPT_REPEATS}x the prompt: "
                     f"{alone * 1e3:.0f} ms, {corun * 1e3:.0f} ms while its decode runs")
        return ttfts, samples, (alone, corun), tuple(s.step_s for s in large_steps)

    @contextlib.asynccontextmanager
    async def _background(self, model: str, text: str, max_tokens: int, repeat: bool):
        """BACKGROUND_CLIENTS clients sending `model` requests while the body runs, which starts at
        their first tokens: back to back (repeat), or one each, cancelled after the body. Yields
        whether every client is still in its request (repeat: still sending)."""
        stop = asyncio.Event()
        firsts = [asyncio.Event() for _ in range(BACKGROUND_CLIENTS)]

        async def client(first: asyncio.Event) -> None:
            await self.stream(model, text, max_tokens, first)
            while repeat and not stop.is_set():
                await self.stream(model, text, max_tokens)

        tasks = [asyncio.create_task(client(first)) for first in firsts]
        try:
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), timeout=300)
            yield lambda: not any(t.done() for t in tasks)
        finally:
            stop.set()
            if not repeat:
                for task in tasks:
                    task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, asyncio.CancelledError):
                raise result
