"""Measured GPU latency profiles (bench/profiles/*.json, from the Aegaeon artifact) as the
step-time models the schedulers and the simulator use.

A file holds, per model, rows of {input_len, batch, prefill_s, decode_step_s}; a row says
prefilling `batch` prompts of `input_len` tokens took prefill_s, and one decode step of
`batch` sequences at a context of about `input_len` took decode_step_s. Fitted here:

    decode:  a + b * (batch * input_len) + c * batch      (StepTimeModel: sum_seq_len, batch_size)
    prefill: a + b * (batch * input_len)                   (PrefillTimeModel: tokens)

Weights are bf16 (2 bytes a parameter); the parameter counts are the models' own (see the
profiles' README). Switch time = weight bytes over the host-to-device bandwidth, which is
stated with its source rather than measured (no GPU here).

Device memory (DeviceMemory, plan_memory): the arena an instance carves from the GPU's memory
less the share left to the tensor library (the paper leaves ~10%): two model slots, each the
size of the largest model served, and the KV region in the rest, in blocks of 16 tokens of
layers x 2 x kv_heads x head_dim x 2 bytes (bf16), from each model's real shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tokenpool.engine.step_profiler import PROFILE_FILE_KIND, InstanceTimings
from tokenpool.engine.step_time_model import (
    KVSwapTime,
    PrefillTimeModel,
    ServingOverhead,
    StepTable,
    StepTimeModel,
    TimingProfile,
)

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
ROW_FIELDS = ("input_len", "batch", "prefill_s", "decode_step_s")
PARAMETERS = {"qwen2_5_7b": 7.6e9, "yi1_5_9b_chat": 8.8e9, "llama2_13b_chat": 13.0e9}
BYTES_PER_PARAMETER = 2  # bf16
# PCIe 5.0 x16 moves 64 GB/s each way in theory; ~50 GB/s is what host-to-device copies from
# pinned memory reach in practice (the H800 testbed of the paper is PCIe 5 x16).
H2D_GBPS = {"H800": 50.0, "H100": 50.0, "H20": 50.0, "A100": 25.0, "A10": 25.0}  # A100/A10: PCIe 4
# (layers, KV heads, head dim) of each model (the profiles' README; the models' config.json).
SHAPES = {"qwen2_5_7b": (28, 4, 128), "yi1_5_9b_chat": (48, 4, 128), "llama2_13b_chat": (40, 40, 128)}
KV_BLOCK_TOKENS = 16  # the engine's paged KV block
# Each GPU's memory, GiB (the cards' HBM/GDDR sizes: H800, H100 and A100 SXM 80 GB, H20 96 GB, A10 24 GB).
DEVICE_MEMORY_GIB = {"H800": 80.0, "H100": 80.0, "H20": 96.0, "A100": 80.0, "A10": 24.0}
LIBRARY_RESERVE = 0.10  # the share of device memory left to the tensor library (the paper: ~10%)


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file, model, row and field."""


@dataclass(frozen=True)
class GpuProfile:
    gpu: str
    h2d_gbps: float
    models: dict[str, TimingProfile]
    serving: ServingOverhead = ServingOverhead()  # these three: CPU profiles only (`profile --live-clock`)
    step_tables: dict[str, StepTable] = field(default_factory=dict)
    kv_swap: dict[str, KVSwapTime] = field(default_factory=dict)
    memory_gib: float | None = None  # the GPU's memory (GPU profiles only)

    def switch_seconds(self, model: str) -> float:
        return self.models[model].weight_bytes / (self.h2d_gbps * 1e9)

    def timings(self, runs_as: dict[str, str]) -> InstanceTimings:
        """The simulated instances' timings: each simulated model (key) runs as one of this
        profile's models (value), with its profile and, where measured, its step table and KV
        swap times."""
        def measured(table: dict) -> dict:
            return {name: table[model] for name, model in runs_as.items() if model in table}

        return InstanceTimings({name: self.models[model] for name, model in runs_as.items()}, self.h2d_gbps,
                               self.serving, measured(self.step_tables), measured(self.kv_swap))


def available() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load(name_or_path: str | Path) -> GpuProfile:
    """A profile by GPU name (h800, h100, h20, a100, a10) or path (a GPU profile, or a file of
    `tokenpool profile`, whose bandwidth is the measured copy bandwidth); ProfileError naming the
    problem."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{str(name_or_path).lower()}.json"
    try:
        text = path.read_text()
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(f"profile {path}: {exc} (available: {', '.join(available())})") from None
    if isinstance(data, dict) and data.get("kind") == PROFILE_FILE_KIND:  # `tokenpool profile` wrote it
        try:
            timings = InstanceTimings.from_json(text, f"profile {path}")
        except ValueError as exc:
            raise ProfileError(str(exc)) from None
        label = f"{data.get('device', '?')} ({data.get('machine', '?')}, {data.get('threads', '?')} threads)"
        return GpuProfile(label, timings.copy_gbps, timings.profiles, timings.serving, timings.step_tables,
                          timings.kv_swap)
    for key in ("gpu", "models"):
        if key not in data:
            raise ProfileError(f"profile {path}: missing field {key!r}")
    gpu = str(data["gpu"])
    if gpu not in H2D_GBPS:
        raise ProfileError(f"profile {path}: no host-to-device bandwidth known for GPU {gpu!r}")
    models = {m: _fit(path, m, rows) for m, rows in data["models"].items()}
    return GpuProfile(gpu, H2D_GBPS[gpu], models, memory_gib=DEVICE_MEMORY_GIB.get(gpu))


def kv_token_bytes(model: str) -> int:
    """One token's KV in bf16: layers x (K and V) x kv_heads x head_dim x 2 bytes."""
    layers, kv_heads, head_dim = SHAPES[model]
    return layers * 2 * kv_heads * head_dim * BYTES_PER_PARAMETER


def kv_block_bytes(model: str) -> int:
    return KV_BLOCK_TOKENS * kv_token_bytes(model)


class DeviceMemoryError(ValueError):
    """A device too small for the arena; the message names the numbers."""


@dataclass(frozen=True)
class DeviceMemory:
    """An instance's share of one GPU: memory less the library's reserve is the arena,
    | KV region | slot A | slot B |, each slot the size of the largest model served."""

    memory_bytes: int
    reserve: float
    slot_bytes: int
    largest: str

    @property
    def arena_bytes(self) -> int:
        return int(self.memory_bytes * (1 - self.reserve))

    @property
    def kv_bytes(self) -> int:
        return self.arena_bytes - 2 * self.slot_bytes

    def kv_blocks(self, model: str) -> int:
        """The KV region in blocks of model's shape (a batch of that model has it to itself)."""
        return self.kv_bytes // kv_block_bytes(model)


def plan_memory(models: Iterable[str], memory_gib: float, reserve: float = LIBRARY_RESERVE) -> DeviceMemory:
    """The arena for serving these profile models on a GPU of memory_gib GiB, reserve of it
    left to the tensor library; DeviceMemoryError (a ValueError) naming the numbers when two slots
    of the largest model leave no KV region."""
    models = set(models)
    unknown = sorted(models - set(SHAPES))
    if unknown:
        raise ProfileError(f"no shape known for {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    if not models:
        raise ValueError("no models to plan device memory for")
    if not memory_gib > 0 or not 0 <= reserve < 1:
        raise ValueError(f"device memory must be > 0 GiB and the reserve in [0, 1): got {memory_gib!r} GiB, "
                         f"reserve {reserve!r}")
    largest = max(models, key=lambda m: PARAMETERS[m])
    slot = int(PARAMETERS[largest] * BYTES_PER_PARAMETER)
    plan = DeviceMemory(int(memory_gib * 2**30), reserve, slot, largest)
    if plan.kv_bytes < kv_block_bytes(largest):
        raise DeviceMemoryError(
            f"two model slots of {largest} ({2 * slot / 2**30:.1f} GiB: 2 x {slot / 2**30:.1f} GiB of bf16 "
            f"weights) do not fit in {memory_gib:g} GiB of device memory less {reserve:.0%} left to the "
            f"tensor library ({plan.arena_bytes / 2**30:.1f} GiB), with room for one KV block "
            f"({kv_block_bytes(largest) / 2**20:.1f} MiB); use a larger --device-memory-gib or smaller "
            f"--memory-reserve")
    return plan


def with_kv(gpu: GpuProfile, models: Iterable[str], swap_gbps: float | None = None) -> GpuProfile:
    """The profile with each model's KV blocks (16 tokens of its real shape) and swap times: KV
    moves between the device and the host pool over the host link (swap_gbps, default the
    profile's host-to-device bandwidth), as the weights do."""
    rate = swap_gbps or gpu.h2d_gbps
    kv = {m: KVSwapTime(KV_BLOCK_TOKENS, kv_block_bytes(m), rate, rate) for m in models}
    return replace(gpu, kv_swap={**gpu.kv_swap, **kv})


def _fit(path: Path, model: str, rows: list) -> TimingProfile:
    if model not in PARAMETERS:
        raise ProfileError(f"profile {path}: unknown model {model!r}; known: {', '.join(PARAMETERS)}")
    for i, row in enumerate(rows):
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            raise ProfileError(f"profile {path}: {model} row {i} lacks {', '.join(missing)}")
    decode = StepTimeModel.fit([(r["batch"] * r["input_len"], r["batch"], r["decode_step_s"]) for r in rows])
    prefill = PrefillTimeModel.fit([(r["batch"] * r["input_len"], r["prefill_s"]) for r in rows])
    return TimingProfile(decode, prefill, int(PARAMETERS[model] * BYTES_PER_PARAMETER))
