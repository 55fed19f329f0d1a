"""Checkpoint loading: safetensors files read through a memory map, each tensor
copied once, straight into its final (possibly fused) place in the model."""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import ModelFolderError
from .model import CausalLM

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
            yield name, _view(buf, base, size, name, info, path)


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


class WeightLoader:
    """Maps Hugging Face tensor names onto CausalLM parameters (fusing q|k|v and gate|up)."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        c = model.config
        self._qkv = {"q_proj": (0, c.q_size), "k_proj": (c.q_size, c.kv_size),
                     "v_proj": (c.q_size + c.kv_size, c.kv_size)}
        self._gate_up = {"gate_proj": (0, c.intermediate_size),
                         "up_proj": (c.intermediate_size, c.intermediate_size)}
        self.expected = {name for name, _ in self._targets()}
        self.loaded: set[str] = set()

    def _targets(self) -> Iterator[tuple[str, torch.Tensor]]:
        c = self.model.config
        yield "model.embed_tokens.weight", self.model.embed
        yield "model.norm.weight", self.model.norm.weight
        if not c.tie_word_embeddings:
            yield "lm_head.weight", self.model.lm_head.weight
        for i, layer in enumerate(self.model.layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", layer.input_norm.weight
            yield p + "post_attention_layernorm.weight", layer.post_norm.weight
            yield p + "self_attn.o_proj.weight", layer.attn.o.weight
            yield p + "mlp.down_proj.weight", layer.mlp.down.weight
            for proj, (start, rows) in self._qkv.items():
                yield p + f"self_attn.{proj}.weight", layer.attn.qkv.weight[start:start + rows]
                if c.qkv_bias:
                    yield p + f"self_attn.{proj}.bias", layer.attn.qkv.bias[start:start + rows]
            for proj, (start, rows) in self._gate_up.items():
                yield p + f"mlp.{proj}.weight", layer.mlp.gate_up.weight[start:start + rows]
            if c.qk_norm:
                yield p + "self_attn.q_norm.weight", layer.attn.q_norm.weight
                yield p + "self_attn.k_norm.weight", layer.attn.k_norm.weight

    def load_folder(self, folder: Path) -> None:
        """Copy every checkpoint tensor into place; raise on a missing, unknown or misshapen one."""
        targets = dict(self._targets())
        for path in checkpoint_files(folder):
            for name, tensor in read_safetensors(path):
                self._load_one(targets, name, tensor, path)
        missing = sorted(self.expected - self.loaded)
        if missing:
            raise ModelFolderError(f"model folder {folder} lacks {len(missing)} weights, "
                                   f"e.g. {', '.join(missing[:3])}")

    def _load_one(self, targets: dict, name: str, tensor: torch.Tensor, path: Path) -> None:
        if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
            return  # some tied checkpoints store the shared matrix twice
        if name.endswith("rotary_emb.inv_freq"):
            return
        target = targets.get(name)
        if target is None:
            raise ModelFolderError(f"{path}: unexpected tensor {name} for a "
                                   f"{self.model.config.architecture} model")
        if tuple(target.shape) != tuple(tensor.shape):
            raise ModelFolderError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                   f"the config implies {tuple(target.shape)}")
        target.copy_(tensor)
        self.loaded.add(name)
