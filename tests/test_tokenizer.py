"""Prompts are encoded as transformers' tokenizer encodes them by default; chat
templates render identically; streamed text deltas add up to the full decode."""

from __future__ import annotations

from tokenpool.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["Hello world", " leading space", "tabs\tand\nnewlines\n\n", "digits 0123456789",
         "unicode: café, naïve, 東京, emoji 🙂", "<|im_start|>user\nhi<|im_end|>", ""]
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 2?"}]


def check_against_transformers(folder):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_folder(folder)
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text
    rendered = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(MESSAGES) == rendered
    ids = ref.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode_chat(MESSAGES) == list(ids)


def test_tiny_tokenizers_match_transformers(tiny_model):
    check_against_transformers(tiny_model)


def test_smollm2_tokenizer_matches_transformers(smollm2_dir):
    check_against_transformers(smollm2_dir)


def test_streamed_deltas_add_up_to_the_decode(smollm2_dir):
    tok = Tokenizer.from_folder(smollm2_dir)
    text = "Streaming text: café 東京 🙂 and more words."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, stop=())
    pieces = []
    for token in ids:
        detok.add(token)
        pieces.append(detok.delta(final=False))
    pieces.append(detok.delta(final=True))
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
