"""Tokenizer and chat template, read from a Hugging Face style tokenizer directory.

GGUF tokenizers are converted once (by transformers, at cold load) into the same
`tokenizer.json` + `tokenizer_config.json` layout, so there is one runtime path for every model,
and it needs only `tokenizers` and `jinja2`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import GearshiftError


def _token_str(tok) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    return tok.get("content")  # AddedToken serialised as a dict


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


@dataclass
class Tokenizer:
    backend: HFTokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    extra_stop_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise GearshiftError(f"no tokenizer.json in {path}")
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, template, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")))

    def save(self, path: Path) -> None:
        self.backend.save(str(path / "tokenizer.json"))
        cfg = {"chat_template": self.chat_template, "bos_token": self.bos_token, "eos_token": self.eos_token}
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @cached_property
    def _byte_decoder(self) -> dict[str, int] | None:
        """GPT-2 style byte-level BPE spells raw bytes as printable characters; this maps them back."""
        if (json.loads(self.backend.to_str()).get("decoder") or {}).get("type") != "ByteLevel":
            return None
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        chars, n = list(printable), 0
        for b in range(256):
            if b not in printable:
                printable.append(b)
                chars.append(256 + n)
                n += 1
        return {chr(c): b for b, c in zip(printable, chars)}

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (a token can hold part of a UTF-8 character)."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        dec = self._byte_decoder
        if dec is not None and all(c in dec for c in piece):
            return bytes(dec[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: the batch call releases the GIL while it works (measured: a 2 MB
        # string held every other thread for 1.3 s through encode, for 22 ms through encode_batch)
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @cached_property
    def longest_piece(self) -> int:
        """Characters of the longest vocabulary entry: no token covers more of a (normalized) text."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages the way transformers' `apply_chat_template` does."""
        if not self.chat_template:
            raise GearshiftError("this model has no chat template; pass a plain text prompt instead")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise GearshiftError("each chat message needs a 'role' and a 'content'")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.exceptions.TemplateError as e:
            raise GearshiftError(f"chat template error: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def encode_prompt(tokenizer: Tokenizer, vocab_size: int, prompt: str | list) -> list[int]:
    """A prompt as token ids: chat messages through the chat template, a string tokenized as is, ids
    checked against the vocabulary (`LLM.encode`, and the cluster's front, which has no model)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        ids = tokenizer.encode_chat(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
        if any(not 0 <= t < vocab_size for t in ids):
            raise GearshiftError(f"token ids must be in [0, {vocab_size})")
    else:
        raise GearshiftError("a prompt is a string, a list of {'role', 'content'} messages, or a list of token ids")
    if not ids:
        raise GearshiftError("the prompt is empty")
    return ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Byte-level BPE can split one character over several tokens; text is held back while the
    tail decodes to a replacement character (the vLLM/TGI prefix-offset scheme).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-6:])
        self.prefix = len(self.ids)
        self.read = len(self.ids)

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        full = self.tok.decode(self.ids[self.prefix :])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            delta = full[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an unfinished character decodes to U+FFFD, as decode() shows)."""
        held = self.tok.decode(self.ids[self.prefix :])[len(self.tok.decode(self.ids[self.prefix : self.read])) :]
        self.prefix = self.read = len(self.ids)
        return held
