"""Checkpoint loading: safetensors files read through a memory map, each tensor
copied once, straight into its final (possibly fused) place in the model."""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelFolderError
from .model import CausalLM
from .model_config import ModelConfig

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) views over a private memory map of path.

    The header's offsets are checked against the file size before any view is made.
    """
    for name, tensor, _ in _safetensors_entries(path):
        yield name, tensor


def _safetensors_entries(path: Path) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(name, view, the tensor's byte offset in the file), offsets checked as above."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 8:
            raise ModelFolderError(f"{path} is too short to be a safetensors file")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    (header_len,) = struct.unpack("<Q", buf[:8])
    if header_len > min(_MAX_HEADER, size - 8):
        raise ModelFolderError(f"{path}: header length {header_len} exceeds the file")
    try:
        header = json.loads(buf[8:8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: malformed safetensors header: {exc}") from exc
    base = 8 + header_len
    for name, info in header.items():
        if name != "__metadata__":
            yield name, _view(buf, base, size, name, info, path), base + info["data_offsets"][0]


def _view(buf, base: int, size: int, name: str, info: dict, path: Path) -> torch.Tensor:
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise ModelFolderError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    shape, (begin, end) = list(info["shape"]), info["data_offsets"]
    count = 1
    for dim in shape:
        count *= dim
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if not (0 <= begin <= end <= size - base) or end - begin != nbytes:
        raise ModelFolderError(f"{path}: tensor {name} offsets [{begin}, {end}) do not fit "
                               f"shape {shape} {info['dtype']} in a file of {size} bytes")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=base + begin).view(shape)


def checkpoint_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelFolderError(f"model folder {folder} has no *.safetensors weights")
    return files


def checkpoint_source(folder: Path) -> str:
    """Which checkpoint a folder holds now, as a digest of its real path and each weight file's
    name, size and modification time: a copy read from another source (an id pointed at another
    folder, or the files rewritten since) is stale."""
    parts = [os.path.realpath(folder)]
    for path in checkpoint_files(folder):
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Source:
    """Rows [start, start + rows) of one of our parameters come from checkpoint tensor hf_name."""

    hf_name: str
    start: int
    rows: int | None  # None: the whole parameter


class WeightLayout:
    """Which checkpoint tensors make up each CausalLM parameter (q|k|v and gate|up fused)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.sources: dict[str, list[Source]] = {}
        for hf_name, param, start, rows in self._mapping():
            self.sources.setdefault(param, []).append(Source(hf_name, start, rows))
        self.by_hf_name = {src.hf_name: (param, src) for param, srcs in self.sources.items() for src in srcs}

    def _mapping(self) -> Iterator[tuple[str, str, int, int | None]]:
        c = self.config
        yield "model.embed_tokens.weight", "embed", 0, None
        yield "model.norm.weight", "norm.weight", 0, None
        if not c.tie_word_embeddings:
            yield "lm_head.weight", "lm_head.weight", 0, None
        for i in range(c.num_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            yield hf + "input_layernorm.weight", ours + "input_norm.weight", 0, None
            yield hf + "post_attention_layernorm.weight", ours + "post_norm.weight", 0, None
            yield hf + "self_attn.o_proj.weight", ours + "attn.o.weight", 0, None
            yield hf + "mlp.down_proj.weight", ours + "mlp.down.weight", 0, None
            qkv = {"q_proj": (0, c.q_size), "k_proj": (c.q_size, c.kv_size),
                   "v_proj": (c.q_size + c.kv_size, c.kv_size)}
            for proj, (start, rows) in qkv.items():
                yield hf + f"self_attn.{proj}.weight", ours + "attn.qkv.weight", start, rows
                if c.qkv_bias:
                    yield hf + f"self_attn.{proj}.bias", ours + "attn.qkv.bias", start, rows
            for j, proj in enumerate(("gate_proj", "up_proj")):
                rows = c.intermediate_size
                yield hf + f"mlp.{proj}.weight", ours + "mlp.gate_up.weight", j * rows, rows
            if c.qk_norm:
                yield hf + "self_attn.q_norm.weight", ours + "attn.q_norm.weight", 0, None
                yield hf + "self_attn.k_norm.weight", ours + "attn.k_norm.weight", 0, None

    def destination(self, param: torch.Tensor, src: Source) -> torch.Tensor:
        return param if src.rows is None else param[src.start:src.start + src.rows]


class Checkpoint:
    """Every tensor of a model folder's safetensors files, as memory-mapped views."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, tuple[torch.Tensor, Path]] = {}
        self.offsets: dict[str, int] = {}  # where each tensor's bytes start in its file
        for path in checkpoint_files(self.folder):
            for name, tensor, offset in _safetensors_entries(path):
                self.tensors[name] = (tensor, path)
                self.offsets[name] = offset

    def check(self, layout: WeightLayout) -> None:
        """Raise on a missing, unexpected or misshapen tensor, before anything is copied."""
        for name, (_, path) in self.tensors.items():
            if name.endswith("rotary_emb.inv_freq") or (
                    name == "lm_head.weight" and layout.config.tie_word_embeddings):
                continue  # recomputed; or the tied matrix stored twice
            if name not in layout.by_hf_name:
                raise ModelFolderError(f"{path}: unexpected tensor {name} for a "
                                       f"{layout.config.architecture} model")
        missing = sorted(set(layout.by_hf_name) - set(self.tensors))
        if missing:
            raise ModelFolderError(f"model folder {self.folder} lacks {len(missing)} weights, "
                                   f"e.g. {', '.join(missing[:3])}")

    def fill(self, layout: WeightLayout, param_name: str, dest: torch.Tensor,
             round_to: torch.dtype | None = None) -> None:
        """Copy the checkpoint tensors of one parameter into dest (its full shape),
        rounded through round_to first when the stored dtype is wider than the model's."""
        for src in layout.sources[param_name]:
            tensor, path = self.tensors[src.hf_name]
            target = layout.destination(dest, src)
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelFolderError(f"{path}: tensor {src.hf_name} has shape {tuple(tensor.shape)}, "
                                       f"the config implies {tuple(target.shape)}")
            if (round_to is None or tensor.dtype == round_to) and _readable_into(target, tensor):
                _read_into(target, path, self.offsets[src.hf_name])
            else:
                target.copy_(tensor if round_to is None else tensor.to(round_to))


def _readable_into(target: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether the stored bytes can be read from the file straight into target's memory."""
    return (target.device.type == "cpu" and target.dtype == stored.dtype and target.is_contiguous()
            and target.numel() > 0)


def _read_into(target: torch.Tensor, path: Path, offset: int) -> None:
    """pread the tensor's bytes into target: the kernel copies from the page cache into place.

    Through the memory map, the same bytes cost a page fault per 4 KiB and torch's copy, whose
    OpenMP threads collapse when another thread of the process computes (a cold load runs beside
    the engine): 0.1 GB/s against 3-8 GB/s for pread into the same host-cache segment.
    """
    view = memoryview((ctypes.c_ubyte * target.nbytes).from_address(target.data_ptr())).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):  # a read returns at most ~2 GiB at a time
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise ModelFolderError(f"{path}: ends inside a tensor at byte {offset + done}")
            done += n
    finally:
        os.close(fd)


def load_weights(model: CausalLM, folder: Path, round_to: torch.dtype | None = None) -> None:
    """Copy a folder's checkpoint into model's (materialised) parameters."""
    layout = WeightLayout(model.config)
    checkpoint = Checkpoint(folder)
    checkpoint.check(layout)
    params = dict(model.named_parameters())
    for name in layout.sources:
        checkpoint.fill(layout, name, params[name], round_to)
