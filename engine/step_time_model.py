"""Step-time models: what one engine step and one prefill cost, fitted from profiling.

The decode scheduler sizes its time quotas from `StepTimeModel` (DESIGN.md
"Scheduling"); dispatch estimates queued prefill work from `PrefillTimeModel`.
Fitted profiles are kept on disk by `ProfileCache` so an instance profiles a model
shape once per machine.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np

log = logging.getLogger(__name__)

PROFILES_ENV = "TOKENPOOL_PROFILES"
KEY_HEX_CHARS = 32


class StepTimeModel(msgspec.Struct, frozen=True):
    """Predicted seconds of one engine step: a + b * sum_seq_len + c * batch_size (DESIGN.md)."""

    a: float
    b: float
    c: float

    def predict(self, sum_seq_len: int, batch_size: int) -> float:
        return self.a + self.b * sum_seq_len + self.c * batch_size

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> StepTimeModel:
        """Least squares of the relative error over (sum_seq_len, batch_size, seconds) samples;
        every coefficient >= 0."""
        rows = _checked(samples, width=3, min_samples=3, names=("sum_seq_len", "batch_size"))
        a, b, c = _fit_nonnegative(rows)
        return cls(a=a, b=b, c=c)


class PrefillTimeModel(msgspec.Struct, frozen=True):
    """Predicted seconds to prefill a prompt: a + b * num_tokens."""

    a: float
    b: float

    def predict(self, num_tokens: int) -> float:
        return self.a + self.b * num_tokens

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, float]]) -> PrefillTimeModel:
        """Least squares of the relative error over (num_tokens, seconds) samples; every coefficient >= 0."""
        rows = _checked(samples, width=2, min_samples=2, names=("num_tokens",))
        a, b = _fit_nonnegative(rows)
        return cls(a=a, b=b)


class StepTable(msgspec.Struct, frozen=True):
    """Measured decode steps by batch size at one context per sequence, for a simulated clock
    where the line of StepTimeModel is too coarse: one-thread CPU steps are concave in the
    batch (SmolLM2 here: 65, 107, 142, 160 ms at 1-4 sequences, 196 ms at 8).

    Between measured batch sizes the time is interpolated, beyond the largest extrapolated
    with the last two's slope; `per_token` adds each token of context beyond `context` per
    sequence (or takes off each one short of it).
    """

    context: int
    batches: tuple[int, ...]
    seconds: tuple[float, ...]
    per_token: float

    def __post_init__(self) -> None:
        if len(self.batches) < 2 or len(self.batches) != len(self.seconds):
            raise ValueError(f"step table needs two or more (batch, seconds) pairs, got {self.batches!r} "
                             f"and {self.seconds!r}")
        if list(self.batches) != sorted(set(self.batches)) or self.batches[0] < 1:
            raise ValueError(f"step table batch sizes must be distinct, ascending and >= 1: {self.batches!r}")
        if not all(s > 0 for s in self.seconds) or not self.per_token >= 0 or self.context < 1:
            raise ValueError(f"step table needs seconds > 0, per_token >= 0 and context >= 1: {self!r}")

    def predict(self, sum_seq_len: int, batch_size: int) -> float:
        at = float(np.interp(batch_size, self.batches, self.seconds))
        if batch_size > self.batches[-1]:
            slope = (self.seconds[-1] - self.seconds[-2]) / (self.batches[-1] - self.batches[-2])
            at = self.seconds[-1] + max(0.0, slope) * (batch_size - self.batches[-1])
        return max(at + self.per_token * (sum_seq_len - batch_size * self.context), self.seconds[0] / 2)


class KVSwapTime(msgspec.Struct, frozen=True):
    """What moving one model's KV between the device and the host pool takes, for a simulated
    clock: whole blocks of block_size tokens, block_bytes each, at the rates a KVSwapper
    measured (`tokenpool profile --live-clock`). A sequence's swap is one task on the
    instance's single swapper thread."""

    block_size: int
    block_bytes: int
    out_gbps: float
    in_gbps: float

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_bytes < 1 or not self.out_gbps > 0 or not self.in_gbps > 0:
            raise ValueError(f"KV swap times need block_size, block_bytes >= 1 and rates > 0: {self!r}")

    def seconds(self, seq_len: int, direction: str) -> float:
        """A sequence of seq_len tokens swapped 'out' (device to pool) or 'in'."""
        blocks = -(-seq_len // self.block_size)
        rate = self.out_gbps if direction == "out" else self.in_gbps
        return blocks * self.block_bytes / (rate * 1e9)


class ServingOverhead(msgspec.Struct, frozen=True):
    """What the serving path adds to the engine's own times, measured through a live stack
    (`tokenpool profile --live-clock`; bench/serving_overhead.py) for the simulator's clock:

    request_s: a request's first token later than its prefill (proxy, RPCs, KV hand-off),
    step_s + token_s * batch: a decode step longer than the engine's step (token streaming),
    corun_decode_factor, corun_step_s: while a prefill instance computes, a decode step
      takes this many times the engine's step plus this much more (the CPU instances share
      the machine's cores and memory bandwidth with each other and the proxy),
    corun_prefill_factor: a prefill this many times longer while a decode instance has work,
    prefetch_factor: a prefetch copy (a thread beside the compute thread, copying the next
      model into the free slot) costs the instance's compute this many seconds per second the
      copy takes alone (weight bytes over the copy bandwidth): cores and memory bandwidth are
      shared.

    None for GPU profiles: the paper's step times are the engine's, and its instances do not
    share cores. Schedulers never see these: live instances predict from the engine's times.
    """

    request_s: float = 0.0
    step_s: float = 0.0
    token_s: float = 0.0
    corun_step_s: float = 0.0
    corun_prefill_factor: float = 1.0
    corun_decode_factor: float = 1.0
    prefetch_factor: float = 0.0

    def __post_init__(self) -> None:
        for name in ("request_s", "step_s", "token_s", "corun_step_s", "prefetch_factor"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"serving overhead {name} must be >= 0, got {value!r}")
        for name in ("corun_prefill_factor", "corun_decode_factor"):
            value = getattr(self, name)
            if not value >= 1:
                raise ValueError(f"serving overhead {name} must be >= 1, got {value!r}")

    def decode_step(self, engine_s: float, batch_size: int, prefill_busy: bool) -> float:
        """A served decode step whose engine step takes engine_s."""
        served = engine_s + self.step_s + self.token_s * batch_size
        if prefill_busy:
            served += engine_s * (self.corun_decode_factor - 1) + self.corun_step_s
        return served


class TimingProfile(msgspec.Struct, frozen=True):
    """What scheduling knows of one model shape on one instance."""

    decode: StepTimeModel
    prefill: PrefillTimeModel
    weight_bytes: int


def _checked(samples: Sequence[tuple], width: int, min_samples: int, names: tuple[str, ...]) -> np.ndarray:
    """The samples as a float array [n, width], or ValueError naming the first bad one."""
    if len(samples) < min_samples:
        raise ValueError(f"need at least {min_samples} samples to fit, got {len(samples)}")
    for i, sample in enumerate(samples):
        if len(sample) != width:
            raise ValueError(f"sample {i} {sample!r} has {len(sample)} fields, expected {width}")
        for name, value in zip(names, sample[:-1], strict=True):
            if value < 0:
                raise ValueError(f"sample {i}: {name} must be >= 0, got {value!r}")
        if not sample[-1] > 0:
            raise ValueError(f"sample {i}: seconds must be > 0, got {sample[-1]!r}")
    return np.asarray(samples, dtype=np.float64)


def _fit_nonnegative(rows: np.ndarray) -> list[float]:
    """Non-negative least squares for y = x0 + x1*col0 + ..., with rows = [inputs..., y], of the
    relative error (each row weighted 1/y): a one-sequence step is predicted as closely as an
    eight-sequence one, instead of the long steps' absolute errors deciding the fit.

    With at most three terms, trying every subset of terms and keeping the best fit whose
    coefficients are all >= 0 is exact NNLS: a term that would go negative is dropped and
    the rest refitted, instead of clipping it and leaving the others biased.
    """
    weight = 1.0 / rows[:, -1]
    design = np.column_stack([np.ones(len(rows)), rows[:, :-1]]) * weight[:, None]
    y = np.ones(len(rows))  # rows[:, -1] * weight
    num_terms = design.shape[1]
    best, best_residual = [0.0] * num_terms, float(np.sum(y * y))
    for size in range(1, num_terms + 1):
        for subset in itertools.combinations(range(num_terms), size):
            coef = np.linalg.lstsq(design[:, subset], y, rcond=None)[0]
            if np.any(coef < 0):
                continue
            residual = float(np.sum((design[:, subset] @ coef - y) ** 2))
            if residual < best_residual - 1e-12 * max(best_residual, 1e-30):
                best, best_residual = [0.0] * num_terms, residual
                for term, value in zip(subset, coef, strict=True):
                    best[term] = float(value)
    return best


class ProfileCache:
    """Profiles on disk, one JSON file (msgspec) per key, mode 0600 in a 0700 folder.

    The root defaults to $TOKENPOOL_PROFILES, else ~/.cache/tokenpool/profiles. A profile
    is a measurement, not state: an unreadable one is re-measured, never fatal.
    """

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            env = os.environ.get(PROFILES_ENV)
            root = Path(env) if env else Path.home() / ".cache" / "tokenpool" / "profiles"
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if not key or not all(ch.isalnum() or ch in "-_" for ch in key):
            raise ValueError(f"profile key must be non-empty [A-Za-z0-9_-], got {key!r}")
        return self.root / f"{key}.json"

    def get(self, key: str) -> TimingProfile | None:
        """The stored profile, or None if missing; a corrupt file logs a warning and reads as missing."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("profile %s unreadable, ignoring it: %s", path, exc)
            return None
        try:
            return msgspec.json.decode(data, type=TimingProfile)
        except msgspec.DecodeError as exc:
            log.warning("profile %s is corrupt, ignoring it: %s", path, exc)
            return None

    def put(self, key: str, profile: TimingProfile) -> None:
        """Write atomically (temp file + rename), so a reader sees the old profile or the new one."""
        path = self._path(key)
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)  # mkdir's mode is filtered by the umask
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.json.encode(profile))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @staticmethod
    def key(**parts: object) -> str:
        """A stable, filename-safe key for a model shape on a machine (sha256 hex of the sorted parts)."""
        if not parts:
            raise ValueError("profile key needs at least one part, e.g. arch='llama'")
        text = msgspec.json.encode({name: repr(parts[name]) for name in sorted(parts)})
        return hashlib.sha256(text).hexdigest()[:KEY_HEX_CHARS]
