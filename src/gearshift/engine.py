"""The engine: prompts in, tokens and text out.

One decode loop (`_steps`) serves a single prompt and a batch alike: prompts are left-padded
into one KV cache, prefilled in chunks, then decoded one token per row per step. Text handling
(incremental detokenization, stop strings) lives in `_TextState`, shared by `generate` and
`stream`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import GearshiftError
from .kv_cache import KVCache
from .loading import Loaded, load as load_weights
from .model import Transformer
from .sampling import SamplingParams, make_generator, sample
from .tokenizer import IncrementalDetokenizer, Tokenizer

Prompt = str | list[dict] | list[int]
PREFILL_CHUNK = 512


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    metrics: dict = field(default_factory=dict)


class _TextState:
    """Per-sequence detokenization and stop-string handling.

    Text that might be the start of a stop string is held back, so a stream never shows a
    stop string it later has to take back.
    """

    def __init__(self, tok: Tokenizer, prompt_ids: list[int], stop: list[str]):
        self.detok = IncrementalDetokenizer(tok, prompt_ids)
        self.stop = stop
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.text += self.detok.push([token])
        safe = len(self.text)
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
                safe = at
                break
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):  # a stop string may be starting
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        safe = max(safe, self.emitted)
        delta = self.text[self.emitted:safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta


class LLM:
    """A loaded model with its tokenizer: `generate` returns completions, `stream` yields text."""

    def __init__(self, loaded: Loaded):
        self.loaded = loaded
        self.model: Transformer = loaded.model
        self.tokenizer: Tokenizer = loaded.tokenizer
        cfg = self.model.cfg
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_id is not None:
            self.eos_ids.add(self.tokenizer.eos_id)
        self._cache: KVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ prompts

    def encode(self, prompt: Prompt) -> list[int]:
        """Chat messages go through the chat template; a string is tokenized as is; ids pass through."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.encode_chat(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            if any(not 0 <= t < self.model.cfg.vocab_size for t in ids):
                raise GearshiftError(f"token ids must be in [0, {self.model.cfg.vocab_size})")
        else:
            raise GearshiftError("a prompt is a string, a list of {'role', 'content'} messages, or a list of token ids")
        if not ids:
            raise GearshiftError("the prompt is empty")
        return ids

    def _check_length(self, n_prompt: int, p: SamplingParams) -> int:
        window = self.model.cfg.max_seq_len
        if n_prompt >= window:
            raise GearshiftError(f"prompt is {n_prompt} tokens but the context window is {window}")
        return min(p.max_tokens, window - n_prompt)

    def _get_cache(self, batch: int, length: int) -> KVCache:
        """Reuse one cache for single-prompt requests: no allocation per request once warm."""
        if batch == 1 and self._cache is not None and self._cache.max_len >= length:
            self._cache.reset()
            return self._cache
        cache = self.model.new_cache(batch, length)
        if batch == 1:
            self._cache = cache
        return cache

    # ------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def _steps(self, prompts: list[list[int]], p: SamplingParams, stats: dict) -> Iterator[list[int]]:
        """Yield one new token per row per step, until the caller stops or max_tokens."""
        batch, longest = len(prompts), max(len(x) for x in prompts)
        budget = min(self._check_length(len(x), p) for x in prompts)
        cache = self._get_cache(batch, longest + budget)
        pad = torch.tensor([longest - len(x) for x in prompts], device=self.device)
        cache.reset(pad)
        tokens = torch.tensor([[0] * (longest - len(x)) + x for x in prompts], device=self.device)
        gen = make_generator(p.seed, self.device)
        t0 = time.perf_counter()
        for s in range(0, longest, PREFILL_CHUNK):
            logits = self.model(tokens[:, s:s + PREFILL_CHUNK], cache, last_only=True)
        stats["prefill_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            for i in range(budget):
                nxt = sample(logits[:, -1], p, gen)
                yield nxt.tolist()
                stats["steps"] = i + 1
                if i + 1 < budget:
                    logits = self.model(nxt[:, None], cache)
        finally:
            stats["decode_s"] = time.perf_counter() - t0
            stats["target_forwards"] = stats.get("steps", 0)

    def _iterate(self, prompts: list[list[int]], p: SamplingParams):
        """Yield (row, text delta) as tokens arrive; return the finished completions."""
        states = [_TextState(self.tokenizer, ids, p.stop) for ids in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        reason: list[str | None] = [None] * len(prompts)
        stats: dict = {}
        steps = self._steps(prompts, p, stats)
        try:
            for toks in steps:
                for r, t in enumerate(toks):
                    if reason[r]:
                        continue
                    if t in self.eos_ids and not p.ignore_eos:
                        reason[r] = "stop"
                        continue
                    out[r].append(t)
                    delta = states[r].push(t)
                    if states[r].stopped:
                        reason[r] = "stop"
                    if delta:
                        yield r, delta
                if all(reason):
                    break
        finally:
            steps.close()
        for r, st in enumerate(states):
            if tail := st.flush():
                yield r, tail
        n_gen, decode_s = sum(len(o) for o in out), stats.get("decode_s", 0.0)
        metrics = {"prefill_s": stats.get("prefill_s", 0.0), "decode_s": decode_s, "generated_tokens": n_gen,
                   "target_forwards": stats.get("target_forwards", 0),
                   "tok_per_s": n_gen / decode_s if decode_s > 0 else 0.0}
        return [Completion(st.text, o, len(ids), r or "length", metrics)
                for st, o, ids, r in zip(states, out, prompts, reason)]

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: Prompt | list[Prompt], **params) -> Completion | list[Completion]:
        """Complete one prompt, or several at once (a list of prompts) in one batch."""
        p = SamplingParams(**params)
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        it = self._iterate([self.encode(x) for x in (prompt if many else [prompt])], p)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value if many else done.value[0]

    def stream(self, prompt: Prompt, **params) -> Iterator[str]:
        """Yield text deltas as they are generated; the finished Completion is then in `.last`."""
        it = self._iterate([self.encode(prompt)], SamplingParams(**params))
        while True:
            try:
                _, delta = next(it)
            except StopIteration as done:
                self.last = done.value[0]
                return
            yield delta


def load(model: str | Path | None = None, device: str | None = None, weights: str = "auto") -> LLM:
    """Load a model (None = the default SmolLM2-135M-Instruct, pulled on first use)."""
    return LLM(load_weights(model, device=device, weights=weights))
