"""Open-loop workloads: Poisson arrivals per model over real conversations, and the JSONL
trace format a benchmark replays.

A trace file holds one JSON object per line, in arrival order:

    {"arrival_s":0.42,"model":"qwen-0","prompt":"...","max_tokens":87,"request_id":"r000000"}
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
from tokenpool.bench.sharegpt import Conversation


class TraceRequest(msgspec.Struct, frozen=True):
    """One request of a trace. `prompt` is real text; `max_tokens` is the token count of
    the conversation's reference answer, capped by the workload's `max_output_tokens`."""

    arrival_s: float  # seconds since the trace's start
    model: str
    prompt: str
    max_tokens: int
    request_id: str


@dataclass(frozen=True)
class WorkloadConfig:
    models: tuple[str, ...]  # model names; each gets its own Poisson stream
    rate_per_model: float  # requests per second, per model
    duration_s: float  # arrivals fall in [0, duration_s)
    seed: int = 0  # seeds the one numpy Generator behind arrivals and conversation draws
    max_prompt_tokens: int = 512  # longer prompts are skipped and redrawn (see make_trace)
    max_output_tokens: int = 256  # cap on max_tokens

    def __post_init__(self):
        if not self.models:
            raise ValueError(f"models must be non-empty, got {self.models!r}")
        for name in ("rate_per_model", "duration_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("max_prompt_tokens", "max_output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


def make_trace(
    config: WorkloadConfig, pairs: Sequence[Conversation], count_tokens: Callable[[str], int]
) -> list[TraceRequest]:
    """Poisson arrivals for every model (exponential inter-arrival times, mean
    1/rate_per_model), merged and sorted by time; each request then draws a conversation
    uniformly from `pairs`, all from one Generator(PCG64(seed)), so a seed fixes the trace.

    A conversation whose prompt is longer than `max_prompt_tokens` (by `count_tokens`) is
    skipped and redrawn, so prompts are whole real text and the draw is uniform over the
    conversations that fit. max_tokens = min(count_tokens(answer), max_output_tokens), at
    least 1. ValueError if no conversation fits.
    """
    rng = np.random.Generator(np.random.PCG64(config.seed))
    arrivals = sorted(
        (t, m) for m, model in enumerate(config.models) for t in _poisson_arrivals(rng, config)
    )
    picker = _PairPicker(pairs, count_tokens, config.max_prompt_tokens)
    trace = []
    for i, (t, m) in enumerate(arrivals):
        pair, answer_tokens = picker.draw(rng)
        trace.append(TraceRequest(
            arrival_s=t, model=config.models[m], prompt=pair.prompt,
            max_tokens=max(1, min(answer_tokens, config.max_output_tokens)), request_id=f"r{i:06d}",
        ))
    return trace


def _poisson_arrivals(rng: np.random.Generator, config: WorkloadConfig) -> list[float]:
    """Arrival times in [0, duration_s) of one model's Poisson stream."""
    expected = config.rate_per_model * config.duration_s
    batch = int(expected + 6 * math.sqrt(expected) + 16)
    times: list[float] = []
    t = 0.0
    while True:
        for gap in rng.exponential(1.0 / config.rate_per_model, size=batch):
            t += float(gap)
            if t >= config.duration_s:
                return times
            times.append(t)


class _PairPicker:
    """Uniform draws over the pairs whose prompt fits; token counts computed once per pair."""

    def __init__(self, pairs: Sequence[Conversation], count_tokens: Callable[[str], int], max_prompt: int):
        if not pairs:
            raise ValueError("pairs must be non-empty")
        self._pairs = pairs
        self._count = count_tokens
        self._max_prompt = max_prompt
        self._answer_tokens: dict[int, int | None] = {}  # None: prompt too long
        self._rejected = 0

    def draw(self, rng: np.random.Generator) -> tuple[Conversation, int]:
        while True:
            if self._rejected == len(self._pairs):
                raise ValueError(f"no conversation's prompt fits max_prompt_tokens={self._max_prompt}")
            i = int(rng.integers(len(self._pairs)))
            if i not in self._answer_tokens:
                self._answer_tokens[i] = self._measure(self._pairs[i])
                self._rejected += self._answer_tokens[i] is None
            if self._answer_tokens[i] is not None:
                return self._pairs[i], self._answer_tokens[i]

    def _measure(self, pair: Conversation) -> int | None:
        if self._count(pair.prompt) > self._max_prompt:
            return None
        return self._count(pair.answer)


def write_trace(path: Path, trace: Sequence[TraceRequest]) -> None:
    """Write `trace` as JSONL, atomically: a temporary file in the same folder, renamed."""
    path = Path(path)
    encoder = msgspec.json.Encoder()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for request in trace:
                f.write(encoder.encode(request) + b"\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_trace(path: Path) -> list[TraceRequest]:
    """Read a JSONL trace; blank lines are skipped. ValueError naming the file and line
    for a malformed line, a missing or mistyped field, a negative arrival, an arrival
    earlier than the line before (equal times are allowed), max_tokens < 1, or a
    repeated request_id."""
    decoder = msgspec.json.Decoder(TraceRequest)
    trace: list[TraceRequest] = []
    seen: set[str] = set()
    with Path(path).open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                request = decoder.decode(line)
            except msgspec.DecodeError as err:  # ValidationError is a subclass
                raise ValueError(f"{path}:{lineno}: {err}") from err
            problem = _problem(request, trace[-1] if trace else None, seen)
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            seen.add(request.request_id)
            trace.append(request)
    return trace


def _problem(request: TraceRequest, previous: TraceRequest | None, seen: set[str]) -> str | None:
    if not (request.arrival_s >= 0 and math.isfinite(request.arrival_s)):
        return f"arrival_s must be a finite number >= 0, got {request.arrival_s!r}"
    if previous is not None and request.arrival_s < previous.arrival_s:
        return f"arrival_s {request.arrival_s!r} is earlier than the previous line's {previous.arrival_s!r}"
    if request.max_tokens < 1:
        return f"max_tokens must be >= 1, got {request.max_tokens!r}"
    if request.request_id in seen:
        return f"request_id {request.request_id!r} repeats an earlier line's"
    return None


def scale_trace(trace: Sequence[TraceRequest], models: Sequence[str]) -> list[TraceRequest]:
    """The same arrivals and prompts with models reassigned round-robin by request order
    (request i goes to models[i % len(models)]), e.g. to spread one trace over more models."""
    if not models:
        raise ValueError(f"models must be non-empty, got {models!r}")
    return [msgspec.structs.replace(r, model=models[i % len(models)]) for i, r in enumerate(trace)]
