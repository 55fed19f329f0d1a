"""Tiny random checkpoints: same bytes every run, and real to transformers.

Uses the session fixtures `tiny_dir` / `tiny_model` from conftest.py (written once).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from tokenpool.engine import tiny_models
from tokenpool.engine.tiny_models import TINY_MODEL_SPECS, make_tiny_models

PROMPTS = (
    "Hello world",
    " leading space and trailing space ",
    "Prices: 12345 items at 3.14159 each, 2024-11-05",
    "café naïve Straße 中文 한국어 🙂👍",
    "line one\nline two\n\n\tindented\r\nwindows",
    "don't won't I'M they've",
    "def add(a, b):\n    return a + b  # sum",
    "<|im_start|>user\nhi<|im_end|>\n",
    "   ",
    "",
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _spec(folder: Path) -> tiny_models.TinyModelSpec:
    return next(s for s in TINY_MODEL_SPECS if s.name == folder.name)


def test_same_bytes_on_a_second_run_and_on_overwrite(tiny_dir, tmp_path):
    first = _hashes(tiny_dir)
    assert len(first) == 6 * len(TINY_MODEL_SPECS)
    make_tiny_models(tmp_path)
    assert _hashes(tmp_path) == first
    make_tiny_models(tmp_path)  # replaces its own earlier output
    assert _hashes(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(s.name for s in TINY_MODEL_SPECS)


def test_refuses_a_folder_it_did_not_write(tmp_path):
    foreign = tmp_path / "tiny-qwen3"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"precious")
    with pytest.raises(ValueError, match="tiny-qwen3"):
        make_tiny_models(tmp_path)
    assert (foreign / "weights.bin").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-qwen3"]  # nothing written


def test_a_crash_leaves_the_previous_model_or_nothing(tmp_path, monkeypatch):
    make_tiny_models(tmp_path)
    before = _hashes(tmp_path)

    def crash(spec):
        if spec.name == "tiny-qwen2":
            raise RuntimeError("disk full")
        return real_make_weights(spec)

    real_make_weights = tiny_models._make_weights
    monkeypatch.setattr(tiny_models, "_make_weights", crash)
    with pytest.raises(RuntimeError):
        make_tiny_models(tmp_path)
    assert _hashes(tmp_path) == before  # no staging folder left, old models intact
    with pytest.raises(RuntimeError):
        make_tiny_models(tmp_path / "fresh")
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["tiny-llama"]


def test_shapes_cover_what_an_engine_must_handle():
    specs = {s.name: s for s in TINY_MODEL_SPECS}
    ratios = {s.num_attention_heads // s.num_key_value_heads for s in TINY_MODEL_SPECS}
    assert ratios == {1, 2, 4}
    assert any(s.num_key_value_heads == 1 for s in TINY_MODEL_SPECS)  # MQA
    assert sorted(s.tie_word_embeddings for s in TINY_MODEL_SPECS) == [False, False, True, True]
    assert any(s.vocab_size > s.tokenizer_vocab_size for s in TINY_MODEL_SPECS)
    qwen3 = specs["tiny-qwen3"]
    assert qwen3.head_dim * qwen3.num_attention_heads != qwen3.hidden_size


def test_transformers_loads_every_weight_and_runs(tiny_model):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}  # no missing/unexpected/mismatched
    config = json.loads((tiny_model / "config.json").read_text())
    assert type(model).__name__ == config["architectures"][0]
    assert model.dtype == torch.float32
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 5, config["vocab_size"])
    assert torch.isfinite(logits).all()
    if tiny_model.name == "tiny-llama":  # transformers 5 folds rope_scaling into this
        assert model.config.rope_parameters["rope_type"] == "llama3"


def test_greedy_decoding_is_robust_and_varied(tiny_model):
    """Logit gaps far above float noise, so engine-vs-reference greedy parity is stable."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    spec = _spec(tiny_model)
    out = model.generate(
        torch.tensor([[40, 41, 42]]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
        output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )
    gaps = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    new_tokens = out.sequences[0, 3:].tolist()
    assert min(gaps) > 1e-4
    assert len(set(new_tokens)) > 8
    assert max(new_tokens) < spec.tokenizer_vocab_size  # padded rows never win


def test_autotokenizer_matches_tokenizers_and_round_trips(tiny_model):
    hf = transformers.AutoTokenizer.from_pretrained(tiny_model)
    raw = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    bos = "<|endoftext|>" if _spec(tiny_model).add_bos else ""
    for prompt in PROMPTS:
        ids = hf(prompt).input_ids
        assert ids == raw.encode(prompt).ids, prompt
        assert hf.decode(ids) == bos + prompt
        assert raw.decode(ids, skip_special_tokens=False) == bos + prompt


def test_chat_template_renders_chatml(tiny_model):
    hf = transformers.AutoTokenizer.from_pretrained(tiny_model)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks!"},
    ]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert hf.apply_chat_template(messages[:1], tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
    )
    assert hf.eos_token == "<|im_end|>" and hf.convert_tokens_to_ids("<|im_end|>") == 2
