"""Tokenizer: a model folder's tokenizer.json and chat template, encoded as
transformers would by default, plus incremental detokenization for streaming."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import ModelFolderError

# The tokenizers library holds the GIL through encode() and decode() but releases it in their batch
# forms, so a long text encoded on a worker thread stalls the caller's event loop unless it goes
# through the batch call (a tiny model's tokenizer: 4.8 s for 2.4 MB, the loop ran 3 times meanwhile).
LONG_TEXT_CHARS = 1024


class Tokenizer:
    def __init__(self, backend: HFTokenizer, config: dict) -> None:
        self.backend = backend
        self.config = config
        self.chat_template: str | None = config.get("chat_template")

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise ModelFolderError(f"model folder {folder} has no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception
            raise ModelFolderError(f"{path} is not a valid tokenizer: {exc}") from exc
        config_path = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = Path(folder) / "chat_template.jinja"
        if template_path.is_file():
            config["chat_template"] = template_path.read_text()
        return cls(backend, config)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:  # the batch call lets go of the GIL (see LONG_TEXT_CHARS)
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        if len(ids) > LONG_TEXT_CHARS:
            return self.backend.decode_batch([ids], skip_special_tokens=True)[0]
        return self.backend.decode(ids, skip_special_tokens=True)

    def token_string(self, name: str) -> str | None:
        value = self.config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied as transformers' apply_chat_template does."""
        special = {k: self.token_string(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return self._compiled_template().render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special)

    @functools.cached_property
    def _template(self) -> Template:
        # Compiled once: compiling SmolLM2's template took 5 ms, rendering it 0.2 ms, and the
        # proxy renders every chat request's template on its one process.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def _compiled_template(self) -> Template:
        if not self.chat_template:
            raise ModelFolderError("this model has no chat template; run without --chat")
        return self._template

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template already holds every special token, as in transformers.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids.

    Decodes a short window of tokens and only emits text once it no longer ends
    in an incomplete UTF-8 sequence; text that could still become a stop string
    is held back until it cannot.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of self.text already returned
        self._prefix = 0
        self._read = 0
        self._stopped = False

    def add(self, token: int) -> str | None:
        """Append a token; returns the stop string it completed, if any."""
        self.ids.append(token)
        self._catch_up(complete_only=True)
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at >= 0:
                self.text = self.text[:at]
                self._stopped = True
                return stop
        return None

    def _catch_up(self, complete_only: bool) -> None:
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not (complete_only and new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)

    def delta(self, final: bool) -> str:
        """Text not yet returned; unless final, keeps back a possible stop-string prefix and
        an incomplete UTF-8 sequence (at the end those come out as they are)."""
        if final and not self._stopped:
            self._catch_up(complete_only=False)
        hold = 0 if final else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
