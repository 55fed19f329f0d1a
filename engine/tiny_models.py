"""Deterministic tiny random checkpoints of four real architectures, in Hugging Face layout.

Tests and benchmarks need real checkpoints (config.json, model.safetensors, a trained
tokenizer, a chat template) without a download. The four models differ on purpose in
every dimension a serving engine must get right: layers, heads, GQA ratio (1, 2, 4,
MQA), head_dim (Qwen3's != hidden/heads), tied vs untied embeddings, Qwen2's qkv biases,
Qwen3's q/k norms, Llama 3's rope scaling, and a config vocab_size padded beyond the
tokenizer (the padded rows are zero, so they are never the argmax).

    python -m tokenpool.engine.tiny_models OUT_DIR

writes OUT_DIR/tiny-{llama,qwen2,qwen3,mistral}; running it again gives the same bytes.
"""

import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType

import numpy as np
from safetensors.numpy import save

from .tokenizer_training import BOS_TOKEN, SPECIAL_TOKENS, train_byte_level_bpe

EOS_TOKEN = SPECIAL_TOKENS[2]  # <|im_end|>: the ChatML turn end, as in Qwen instruct models
MARKER_FILE = "tokenpool_tiny_model.txt"
"""Present in every folder this module writes; only such folders are ever overwritten."""
_MARKER_TEXT = "Tiny random model written by tokenpool.engine.tiny_models.\n"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, the same for all four models (the template renders no BOS)."""

# Init scales, tuned by measuring 64-step greedy generations with transformers: logits
# spread about 1 (top-1 vs top-2 gap median ~0.2, minimum ~1e-3), so greedy decoding is
# robust to 1e-6 float noise; matrices at 1/sqrt(fan_in) would make logits nearly flat.
# Layer matrices are larger than the embedding so a tied model's residual stream is not
# dominated by the input token's own embedding, which made it repeat one token forever.
_EMBED_STD = 0.1
_MATRIX_STD = 0.15
_NORM_STD = 0.1
_BIAS_STD = 0.05


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and identity of one tiny checkpoint; fields map onto config.json keys."""

    name: str  # folder name
    architecture: str  # config "architectures"[0]
    model_type: str
    seed: int  # numpy PCG64 seed for the weights
    tokenizer_vocab_size: int  # tokens the trained tokenizer has
    vocab_size: int  # rows of embed_tokens / lm_head; >= tokenizer_vocab_size
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    add_bos: bool  # the tokenizer prepends <|endoftext|> as BOS
    tokenizer_split: str = "gpt2"  # pre-tokenizer family, see train_byte_level_bpe
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    extra_config: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))


TINY_MODEL_SPECS = (
    TinyModelSpec(
        "tiny-llama", "LlamaForCausalLM", "llama", seed=1001,
        tokenizer_vocab_size=512, vocab_size=512, hidden_size=128, intermediate_size=320,
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=1024,
        tie_word_embeddings=False, add_bos=True,
        extra_config=MappingProxyType({
            "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
        }),
    ),
    TinyModelSpec(
        "tiny-qwen2", "Qwen2ForCausalLM", "qwen2", seed=1002,
        tokenizer_vocab_size=600, vocab_size=640, hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=512,
        tie_word_embeddings=True, add_bos=False, tokenizer_split="qwen2", qkv_bias=True,
        extra_config=MappingProxyType({
            "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": 2,
        }),
    ),
    TinyModelSpec(
        "tiny-qwen3", "Qwen3ForCausalLM", "qwen3", seed=1003,
        tokenizer_vocab_size=700, vocab_size=704, hidden_size=96, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=1024,
        tie_word_embeddings=True, add_bos=False, tokenizer_split="qwen2", qk_norm=True,
        extra_config=MappingProxyType({
            "attention_bias": False, "rope_scaling": None, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": 4,
        }),
    ),
    TinyModelSpec(
        "tiny-mistral", "MistralForCausalLM", "mistral", seed=1004,
        tokenizer_vocab_size=450, vocab_size=512, hidden_size=128, intermediate_size=288,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
        tie_word_embeddings=False, add_bos=False,
        extra_config=MappingProxyType({"rope_scaling": None, "sliding_window": None}),
    ),
)
"""The four checkpoints make_tiny_models writes, in order."""


def make_tiny_models(out_dir: Path) -> list[Path]:
    """Write the TINY_MODEL_SPECS checkpoints under `out_dir`; return their folders.

    Each folder holds config.json, generation_config.json, model.safetensors (float32),
    tokenizer.json, tokenizer_config.json and MARKER_FILE. Same code, same bytes.
    Each folder is built in a temporary sibling and renamed into place, so a crash never
    leaves a half-written model. A folder written earlier by this function is replaced;
    any other existing path raises ValueError naming it, before anything is written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir / spec.name for spec in TINY_MODEL_SPECS]
    for target in targets:
        _check_replaceable(target)
    for spec, target in zip(TINY_MODEL_SPECS, targets, strict=True):
        _write_atomically(target, partial(_write_model, spec))
    return targets


def make_model(spec: TinyModelSpec, out_dir: Path) -> Path:
    """Write one checkpoint of spec's shape (e.g. a real model's, for timing copies) under
    out_dir, as make_tiny_models does; return its folder."""
    target = Path(out_dir) / spec.name
    _check_replaceable(target)
    _write_atomically(target, partial(_write_model, spec))
    return target


def _check_replaceable(target: Path) -> None:
    """Raise ValueError unless `target` is absent or a folder this module wrote."""
    if target.exists() and not (target / MARKER_FILE).is_file():
        raise ValueError(
            f"{target} exists and is not a tiny model written by tokenpool.engine."
            f"tiny_models (no {MARKER_FILE}); refusing to overwrite it"
        )


def _write_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Run `build` on a fresh temporary sibling of `target`, then swap it into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide the model from other users
        if target.exists():
            # Directories cannot be os.replace'd over a non-empty one: move the old
            # folder aside first, so at every instant `target` is absent or complete.
            retired = staging.with_name(staging.name + ".old")
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_model(spec: TinyModelSpec, folder: Path) -> None:
    """Write every file of one checkpoint into the (empty) `folder`."""
    tokenizer = train_byte_level_bpe(
        spec.tokenizer_vocab_size, spec.add_bos, split=spec.tokenizer_split
    )
    (folder / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(spec))
    _write_json(folder / "config.json", _model_config(spec))
    _write_json(folder / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 2})
    # safetensors orders tensors by (dtype, name), so the header is deterministic too;
    # save() + write_bytes rather than save_file, which creates the file mode 0600.
    weights = save(_make_weights(spec), metadata={"format": "pt"})
    (folder / "model.safetensors").write_bytes(weights)
    (folder / MARKER_FILE).write_text(_MARKER_TEXT, encoding="utf-8")


def _write_json(path: Path, obj: Mapping[str, object]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _model_config(spec: TinyModelSpec) -> dict[str, object]:
    """config.json in the layout real checkpoints ship (rope_theta and rope_scaling as
    separate keys; transformers 5 folds them into rope_parameters when loading)."""
    return {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "torch_dtype": "float32",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.max_position_embeddings,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        **spec.extra_config,
    }


def _tokenizer_config(spec: TinyModelSpec) -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": BOS_TOKEN,
        "model_max_length": spec.max_position_embeddings,
        # Byte-level BPE decodes exactly; the clean-up would turn " ." into ".".
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _tensor_plan(spec: TinyModelSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF tensor name, shape, init kind) in the fixed order the RNG fills them."""
    h = spec.hidden_size
    q = spec.num_attention_heads * spec.head_dim
    kv = spec.num_key_value_heads * spec.head_dim
    plan = [("model.embed_tokens.weight", (spec.vocab_size, h), "embed")]
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        plan.append((p + "input_layernorm.weight", (h,), "norm"))
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            plan.append((f"{p}self_attn.{proj}_proj.weight", (rows, h), "matrix"))
            if spec.qkv_bias:
                plan.append((f"{p}self_attn.{proj}_proj.bias", (rows,), "bias"))
        plan.append((p + "self_attn.o_proj.weight", (h, q), "matrix"))
        if spec.qk_norm:
            plan.append((p + "self_attn.q_norm.weight", (spec.head_dim,), "norm"))
            plan.append((p + "self_attn.k_norm.weight", (spec.head_dim,), "norm"))
        plan.append((p + "post_attention_layernorm.weight", (h,), "norm"))
        plan.append((p + "mlp.gate_proj.weight", (spec.intermediate_size, h), "matrix"))
        plan.append((p + "mlp.up_proj.weight", (spec.intermediate_size, h), "matrix"))
        plan.append((p + "mlp.down_proj.weight", (h, spec.intermediate_size), "matrix"))
    plan.append(("model.norm.weight", (h,), "norm"))
    if not spec.tie_word_embeddings:
        plan.append(("lm_head.weight", (spec.vocab_size, h), "matrix"))
    return plan


def _make_weights(spec: TinyModelSpec) -> dict[str, np.ndarray]:
    """Float32 weights from numpy's PCG64 (stable across numpy versions, unlike torch's
    RNG across torch versions). Vocab rows past the tokenizer are zero, as padding rows
    are in real checkpoints, so greedy decoding never emits an undecodable id."""
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    weights = {}
    for name, shape, kind in _tensor_plan(spec):
        tensor = _init_tensor(rng, shape, kind)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor[spec.tokenizer_vocab_size :] = 0.0
        weights[name] = tensor
    return weights


def _init_tensor(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Float32 normal noise of `shape`: "norm" around 1.0 (no channel silenced), "bias",
    "embed" and "matrix" around 0 with the module's std for that kind."""
    noise = rng.standard_normal(shape)
    if kind == "norm":
        return (1.0 + _NORM_STD * noise).astype(np.float32)
    std = {"embed": _EMBED_STD, "matrix": _MATRIX_STD, "bias": _BIAS_STD}[kind]
    return (std * noise).astype(np.float32)


def main(argv: list[str]) -> int:
    """CLI: write the tiny models under argv[0] and print their folders."""
    if len(argv) != 1:
        print("usage: python -m tokenpool.engine.tiny_models OUT_DIR", file=sys.stderr)
        return 2
    for folder in make_tiny_models(Path(argv[0])):
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
