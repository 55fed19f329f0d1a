"""Train a small byte-level BPE tokenizer on the corpus shipped with the package.

The tiny test checkpoints need a real tokenizer (merges, byte fallback through the
ByteLevel alphabet, special tokens, a post-processor) without downloading one. Training
on the bundled corpus takes well under a second and, with the settings below, gives the
same tokenizer.json bytes on every run.
"""

from importlib import resources
from typing import Literal

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Special tokens with ids 0, 1, 2 in every trained tokenizer (Qwen/ChatML naming)."""

BOS_TOKEN = SPECIAL_TOKENS[0]

# Qwen2/Qwen3's split (digits one by one, no contractions merged into words). Real Qwen
# tokenizer.json files carry it, and transformers 5 rebuilds every model_type "qwen2"
# tokenizer with it whatever tokenizer.json says, so a Qwen checkpoint must use it too.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def load_corpus() -> str:
    """The bundled training text (engine/data/corpus.txt), decoded as UTF-8."""
    data = resources.files("tokenpool.engine").joinpath("data/corpus.txt")
    return data.read_text(encoding="utf-8")


def train_byte_level_bpe(
    vocab_size: int, add_bos: bool, *, split: Literal["gpt2", "qwen2"] = "gpt2"
) -> Tokenizer:
    """Train a byte-level BPE of exactly `vocab_size` tokens on the corpus.

    `split` picks the pre-tokenizer: "gpt2" is ByteLevel with its built-in GPT-2 regex
    (Llama 3, Mistral, SmolLM2 style); "qwen2" is NFC plus QWEN2_SPLIT_REGEX then
    ByteLevel without regex, exactly as in Qwen2/Qwen3 tokenizer.json files.

    Ids 0..2 are SPECIAL_TOKENS, ids 3..258 the 256 ByteLevel alphabet characters, the
    rest merges. With `add_bos`, encoding prepends `<|endoftext|>` as BOS (as Llama
    tokenizers do); otherwise the ByteLevel post-processor adds nothing (GPT-2, SmolLM2).
    Deterministic: the same arguments give the same `to_str()` in every process,
    whatever RAYON_NUM_THREADS or PYTHONHASHSEED is.
    Raises ValueError if `vocab_size` leaves no room for merges (<= 259) or exceeds what
    the corpus supports (merges need pairs seen twice: about 1,800 tokens).
    """
    base = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= base:
        raise ValueError(
            f"vocab_size={vocab_size} must exceed {base}: "
            f"{base} ids are taken by special tokens and the byte alphabet"
        )
    tokenizer = _untrained_tokenizer(add_bos, split)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Deterministic without pinning threads: the trainer orders merges by (count, pair
    # ids) and the counts are sums, so rayon's work splitting cannot change them.
    tokenizer.train_from_iterator(load_corpus().splitlines(keepends=True), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the corpus only supports {tokenizer.get_vocab_size()} tokens, "
            f"asked for vocab_size={vocab_size}"
        )
    return tokenizer


def _untrained_tokenizer(add_bos: bool, split: str) -> Tokenizer:
    """A byte-level BPE pipeline with no vocabulary yet."""
    tokenizer = Tokenizer(models.BPE())
    if split == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif split == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise ValueError(f"split={split!r} must be 'gpt2' or 'qwen2'")
    tokenizer.decoder = decoders.ByteLevel()
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, 0)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer

