"""The engine: prompts in, tokens and text out.

Two decoding strategies share one prefill and one text path. `_steps` (plain) serves a single
prompt and a batch alike: prompts are left-padded into one KV cache, prefilled in chunks, then
decoded one token per row per step. `_speculative_steps` asks a drafter for tokens, scores them
(a chain or a tree) in one target pass, keeps what `verify` accepts and drops the rest from the cache. Text
handling (incremental detokenization, stop strings) lives in `_TextState`, shared by `generate`
and `stream`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .drafters import Drafter, ModelDrafter, Proposal, make_drafter
from .ead import EAD, EntropyGate, Schedule, forward_flops
from .errors import GearshiftError
from .kv_cache import KVCache
from .loading import Loaded, load as load_weights
from .model import Transformer
from .sampling import SamplingParams, entropy, make_generator, sample
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .verify import verify

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
        if not self.stopped:
            self.text += self.detok.flush()
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
        self._drafters: dict[str, Drafter] = {}

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

    def _prefill(self, prompts: list[list[int]], p: SamplingParams, extra: int = 0):
        """Left-pad the prompts into one cache and run all but their last token.

        Every generated token then comes from a step forward (the prompt's last token first), so
        plain and speculative decoding compute the first token the same way, bit for bit.
        Returns (cache, last prompt token per row, token budget).
        """
        batch, longest = len(prompts), max(len(x) for x in prompts)
        budget = min(self._check_length(len(x), p) for x in prompts)
        cache = self._get_cache(batch, min(longest + budget, self.model.cfg.max_seq_len) + extra)
        cache.reset(torch.tensor([longest - len(x) for x in prompts], device=self.device))
        tokens = torch.tensor([[0] * (longest - len(x)) + x for x in prompts], device=self.device)
        self._read(tokens[:, :-1], cache)
        return cache, tokens[:, -1], budget

    def _read(self, tokens: torch.Tensor, cache: KVCache) -> None:
        """Run `tokens` [B, S] into the cache in chunks, for their keys and values only."""
        for s in range(0, tokens.shape[1], PREFILL_CHUNK):
            self.model(tokens[:, s:s + PREFILL_CHUNK], cache, last_only=True)

    @torch.inference_mode()
    def _steps(self, prompts: list[list[int]], p: SamplingParams, stats: dict) -> Iterator[list[list[int]]]:
        """Plain decoding: yield one new token per row per step, until the caller stops or max_tokens."""
        gen = make_generator(p.seed, self.device)
        t0 = time.perf_counter()
        cache, nxt, budget = self._prefill(prompts, p)
        stats["prefill_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            for i in range(budget):
                nxt = sample(self.model(nxt[:, None], cache)[:, -1], p, gen)
                stats["target_forwards"] = i + 1
                yield [[t] for t in nxt.tolist()]
        finally:
            stats["decode_s"] = time.perf_counter() - t0

    @torch.inference_mode()
    def _speculative_steps(self, prompt: list[int], p: SamplingParams, stats: dict,
                           drafter: Drafter) -> Iterator[list[list[int]]]:
        """Draft, verify in one target pass, keep what the verifier accepts, roll back the rest."""
        gen = make_generator(p.seed, self.device)
        t0 = time.perf_counter()
        cache, _, budget = self._prefill([prompt], p, extra=drafter.length.k_max)
        stats["prefill_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        context = list(prompt)
        drafter.reset(prompt)
        produced = 0
        stats.update(target_forwards=0, proposed=0, accepted=0, draft_s=0.0, verify_s=0.0)
        try:
            while produced < budget:
                t1 = time.perf_counter()
                k = min(drafter.length.k, budget - produced - 1, cache.max_len - cache.length - 1)
                proposal = drafter.propose(context, k, p, gen).first(k) if k > 0 else Proposal([])
                t2 = time.perf_counter()
                base = cache.length
                parents = None if proposal.parents is None else [-1] + proposal.parents
                target = self.model(torch.tensor([context[-1:] + proposal.tokens], device=self.device), cache,
                                    parents=parents)[0]
                verdict = verify(target, proposal, p, gen)
                cache.keep(base, [0] + [i + 1 for i in verdict.path])
                drafter.observe(verdict, target)
                drafter.length.update(len(proposal.tokens), verdict.accepted)
                stats["draft_s"] += t2 - t1
                stats["verify_s"] += time.perf_counter() - t2
                stats["proposed"] += len(proposal.tokens)
                stats["accepted"] += verdict.accepted
                stats["target_forwards"] += 1
                context += verdict.tokens
                produced += len(verdict.tokens)
                yield [verdict.tokens]
        finally:
            stats["decode_s"] = time.perf_counter() - t0
            if isinstance(drafter, EntropyGate):
                drafter.account(stats, len(prompt), self.model)

    @torch.inference_mode()
    def _ead_steps(self, prompt: list[int], p: SamplingParams, stats: dict, small: ModelDrafter,
                   cfg: EAD) -> Iterator[list[list[int]]]:
        """Lossy EAD: the model the schedule names writes the next token; the other catches up
        with a batched forward over what it missed when its turn comes (the prompt included: a
        model that never gets a turn never reads it). The large model's own tokens come from
        one-token steps, so tau 0 is plain decoding bit for bit. Compute counts every token each
        model reads, against the large model reading the prompt and the output alone."""
        gen = make_generator(p.seed, self.device)
        budget = self._check_length(len(prompt), p)
        cache = self._get_cache(1, len(prompt) + budget)
        cache.reset()
        t0 = time.perf_counter()
        small.reset(prompt)
        schedule = Schedule(cfg)
        cost = {"large": forward_flops(self.model), "small": forward_flops(small.model, small.n_layers)}
        stats.update(prefill_s=0.0, target_forwards=0, large_tokens=0, small_tokens=0, flops=0.0,
                     large_only_flops=(len(prompt) - 1) * cost["large"])
        context = list(prompt)
        try:
            for _ in range(budget):
                who = "large" if schedule.large else "small"
                if schedule.large:  # catch up as prefill does: the token itself comes from a one-token step
                    fed = context[cache.length:]
                    x = torch.tensor([fed], device=self.device)
                    self._read(x[:, :-1], cache)
                    logits = self.model(x[:, -1:], cache)[0, -1]
                    stats["target_forwards"] += 1
                else:
                    fed = context[small.cache.length:]
                    logits = small.logits(fed)
                stats[f"{who}_tokens"] += 1
                stats["flops"] += len(fed) * cost[who]
                stats["large_only_flops"] += cost["large"]
                schedule.push(entropy(logits))
                token = int(sample(logits[None], p, gen)[0])
                context.append(token)
                yield [[token]]
        finally:
            stats["decode_s"] = time.perf_counter() - t0

    def _iterate(self, prompts: list[list[int]], p: SamplingParams, drafter: Drafter | None = None,
                 ead: tuple[ModelDrafter, EAD] | None = None):
        """Yield (row, text delta) as tokens arrive; return the finished completions."""
        states = [_TextState(self.tokenizer, ids, p.stop) for ids in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        reason: list[str | None] = [None] * len(prompts)
        stats: dict = {}
        consumed = 0  # tokens taken from the model, the stopping EOS included
        if ead is not None:
            steps = self._ead_steps(prompts[0], p, stats, *ead)
        elif drafter is not None:
            steps = self._speculative_steps(prompts[0], p, stats, drafter)
        else:
            steps = self._steps(prompts, p, stats)
        try:
            for new in steps:
                for r, toks in enumerate(new):
                    for t in toks:
                        if reason[r]:
                            break
                        consumed += 1
                        if t in self.eos_ids and not p.ignore_eos:
                            reason[r] = "stop"
                            break
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
        metrics = _metrics(stats, sum(len(o) for o in out), consumed, len(prompts))
        return [Completion(st.text, o, len(ids), r or "length", metrics)
                for st, o, ids, r in zip(states, out, prompts, reason)]

    # ------------------------------------------------------------------ public API

    def drafter(self, spec: str | Drafter | None) -> Drafter | None:
        """A drafter by name ("lookup", "early-exit:L", "model:PATH", "auto"), built once and reused."""
        if spec is None or not isinstance(spec, str):
            return spec
        if spec not in self._drafters:
            self._drafters[spec] = make_drafter(spec, self)
        return self._drafters[spec]

    def _strategy(self, drafter: str | Drafter | None, ead: EAD | None):
        """(drafter, (small model, EAD) or None) for one generation."""
        if ead is None:
            return self.drafter(drafter), None
        if drafter is not None:
            raise GearshiftError("use a drafter or entropy-adaptive decoding, not both")
        small = self.drafter(ead.small)
        if not isinstance(small, ModelDrafter):
            raise GearshiftError(f"ead needs a small model (early-exit[:L] or model:PATH), not {ead.small!r}")
        return (EntropyGate(small, ead), None) if ead.verify else (None, (small, ead))

    def generate(self, prompt: Prompt | list[Prompt], drafter: str | Drafter | None = None, ead: EAD | None = None,
                 **params) -> Completion | list[Completion]:
        """Complete one prompt, or several (a list of prompts: one batch, or one by one when drafting).

        With a drafter, decoding is speculative and lossless: greedy output is token-identical
        to plain decoding, sampled output has the target's distribution. With `ead`, a small model
        writes where it is sure (see `ead.py`): lossy, unless `ead.verify`.
        """
        p = SamplingParams(**params)
        d, small = self._strategy(drafter, ead)
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = [self.encode(x) for x in (prompt if many else [prompt])]
        groups = [prompts] if d is None and small is None else [[x] for x in prompts]
        results = []
        for group in groups:
            it = self._iterate(group, p, d, small)
            while True:
                try:
                    next(it)
                except StopIteration as done:
                    results += done.value
                    break
        return results if many else results[0]

    def stream(self, prompt: Prompt, drafter: str | Drafter | None = None, ead: EAD | None = None,
               **params) -> Iterator[str]:
        """Yield text deltas as they are generated; the finished Completion is then in `.last`."""
        p = SamplingParams(**params)
        it = self._iterate([self.encode(prompt)], p, *self._strategy(drafter, ead))
        while True:
            try:
                _, delta = next(it)
            except StopIteration as done:
                self.last = done.value[0]
                return
            yield delta


def _metrics(stats: dict, generated: int, consumed: int, rows: int) -> dict:
    """Per-generation numbers. MAT, mean tokens per target forward, is 1.0 for plain decoding as in
    Spec-Bench (the prefill of all but the last prompt token produces no token and is not counted)."""
    decode_s, forwards = stats.get("decode_s", 0.0), stats.get("target_forwards", 0)
    m = {"prefill_s": stats.get("prefill_s", 0.0), "decode_s": decode_s, "generated_tokens": generated,
         "target_forwards": forwards, "tok_per_s": generated / decode_s if decode_s > 0 else 0.0,
         "mat": consumed / (forwards * rows) if forwards else 0.0}
    if "large_tokens" in stats:
        made = stats["large_tokens"] + stats["small_tokens"]
        m.update(large_tokens=stats["large_tokens"], small_tokens=stats["small_tokens"],
                 large_fraction=stats["large_tokens"] / made if made else 0.0,
                 flops=stats["flops"], large_only_flops=stats["large_only_flops"],
                 relative_compute=stats["flops"] / stats["large_only_flops"] if made else 0.0)
    if "proposed" in stats:
        m.update(proposed=stats["proposed"], accepted=stats["accepted"], draft_s=stats["draft_s"],
                 verify_s=stats["verify_s"],
                 acceptance_rate=stats["accepted"] / stats["proposed"] if stats["proposed"] else 0.0)
    return m


def load(model: str | Path | None = None, device: str | None = None, weights: str = "auto") -> LLM:
    """Load a model (None = the default SmolLM2-135M-Instruct, pulled on first use)."""
    return LLM(load_weights(model, device=device, weights=weights))
