"""Drafters: everything that proposes tokens for the target model to verify.

A drafter is any object with `reset`, `propose` and `observe` (the `Drafter` protocol). Model
drafters return the distribution each token was drawn from, so rejection sampling can stay exact;
lookup drafters are deterministic and return none (the verifier treats them as one-hot).
Every drafter adapts its draft length online through `DraftLength`.

    lookup              n-gram match over prompt + generated tokens (prompt lookup decoding)
    early-exit:L        the target's first L layers + its final norm and LM head (no extra weights)
    model:PATH          a separate, smaller model sharing the tokenizer (its own KV cache)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import GearshiftError
from .model import Transformer
from .sampling import SamplingParams, probs


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V]: what each token was sampled from; None = deterministic


class Drafter(Protocol):
    name: str
    length: "DraftLength"

    def reset(self, prompt: list[int]) -> None:
        """A new sequence starts with `prompt`."""

    def propose(self, context: list[int], k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        """Up to k tokens that may follow `context` (prompt + everything generated so far)."""

    def observe(self, accepted: int) -> None:
        """The target accepted the first `accepted` tokens of the last proposal."""


@dataclass
class DraftLength:
    """Online draft length: one longer after a fully accepted draft, one shorter after a miss."""
    k: int = 4
    k_min: int = 1
    k_max: int = 8

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.k = min(self.k + 1, self.k_max) if accepted == proposed else max(self.k - 1, self.k_min)


class LookupDrafter:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (longest n
    first) and propose what followed it. An index of n-grams makes each lookup O(max_n).

    The match length is the drafter's confidence: an n-token match proposes at most
    `per_match_token * n` tokens, so a one-token coincidence does not buy a long, costly draft
    (Spec-Bench, 2 questions per category: 3 per matched token gave 1.26x, unlimited 1.18x).
    """

    name = "lookup"

    def __init__(self, min_n: int = 1, max_n: int = 4, k_max: int = 8, per_match_token: int = 3):
        if not 1 <= min_n <= max_n:
            raise GearshiftError("lookup needs 1 <= min_n <= max_n")
        self.min_n, self.max_n, self.per_match_token = min_n, max_n, per_match_token
        self.length = DraftLength(k=k_max, k_min=1, k_max=k_max)
        self.reset([])

    def reset(self, prompt: list[int]) -> None:
        self.index: list[dict[tuple, int]] = [dict() for _ in range(self.max_n + 1)]
        self.indexed = 0  # n-grams ending before this position are in the index

    def _extend_index(self, context: list[int]) -> None:
        # index every n-gram that ends before the last token, so the suffix never matches itself
        for end in range(max(self.indexed, 1), len(context)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.index[n][tuple(context[end - n:end])] = end
        self.indexed = max(self.indexed, len(context))

    def propose(self, context: list[int], k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        self._extend_index(context)
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            end = self.index[n].get(tuple(context[-n:]))
            if end is not None:
                return Proposal(context[end:end + min(k, self.per_match_token * n)])
        return Proposal([])

    def observe(self, accepted: int) -> None:
        pass


class ModelDrafter:
    """A draft language model with its own KV cache, kept in step with the accepted tokens.

    `n_layers` makes it the early-exit sub-model of a larger network: the first L blocks plus the
    shared final norm and LM head. Drafting stops early when the draft's top probability falls
    below `confidence` (a draft it is unsure of would mostly be rejected anyway).
    """

    def __init__(self, model: Transformer, target_vocab: int, name: str, n_layers: int | None = None,
                 confidence: float = 0.3, k_max: int = 8):
        self.model, self.target_vocab, self.name, self.n_layers = model, target_vocab, name, n_layers
        self.confidence = confidence
        self.length = DraftLength(k=4, k_min=1, k_max=k_max)
        self.cache = None
        self.base = 0

    def reset(self, prompt: list[int]) -> None:
        need = min(self.model.cfg.max_seq_len, len(prompt) + 4096)
        if self.cache is None or self.cache.max_len < need:
            self.cache = self.model.new_cache(1, need, n_layers=self.n_layers)
        self.cache.reset()

    def _logits(self, tokens: list[int]) -> torch.Tensor:
        x = torch.tensor([tokens], device=self.model.device)
        logits = self.model(x, self.cache, last_only=True, n_layers=self.n_layers)[0, -1]
        v = self.target_vocab  # align vocabularies: ids the target lacks are never proposed
        if logits.shape[-1] >= v:
            return logits[:v]
        return torch.cat([logits, logits.new_full((v - logits.shape[-1],), float("-inf"))])

    @torch.inference_mode()
    def propose(self, context: list[int], k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        self.base = len(context)
        if len(context) + k >= self.cache.max_len:
            return Proposal([])
        logits = self._logits(context[self.cache.length:])
        tokens, dists = [], []
        for i in range(k):
            q = probs(logits, params)
            t = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=gen))
            if i > 0 and float(q.max()) < self.confidence:
                break
            tokens.append(t)
            dists.append(q)
            if i + 1 < k:
                logits = self._logits([t])
        return Proposal(tokens, None if params.greedy else torch.stack(dists))

    def observe(self, accepted: int) -> None:
        # keep the context and the accepted draft tokens; the target's own token is fed next time
        self.cache.rollback(min(self.cache.length, self.base + accepted))


def make_drafter(spec: str, llm) -> Drafter:
    """Build a drafter from its command-line name for the target `llm`."""
    from .engine import load

    vocab = llm.model.cfg.vocab_size
    if spec == "auto":
        spec = "lookup"
    if spec == "lookup":
        return LookupDrafter()
    if spec.startswith("early-exit"):
        layers = spec.partition(":")[2] or str(default_exit_layer(llm.model.cfg.n_layers))
        if not layers.isdigit() or not 1 <= int(layers) < llm.model.cfg.n_layers:
            raise GearshiftError(f"early-exit needs a layer count from 1 to {llm.model.cfg.n_layers - 1}, got {layers!r}")
        return ModelDrafter(llm.model, vocab, f"early-exit:{layers}", n_layers=int(layers))
    if spec.startswith("model:"):
        draft = load(spec[len("model:"):], device=str(llm.device))
        if draft.tokenizer.backend.get_vocab() != llm.tokenizer.backend.get_vocab():
            common = set(draft.tokenizer.backend.get_vocab().items()) & set(llm.tokenizer.backend.get_vocab().items())
            if len(common) < 0.9 * min(vocab, draft.model.cfg.vocab_size):
                raise GearshiftError("the draft model does not share the target's tokenizer")
        return ModelDrafter(draft.model, vocab, spec)
    raise GearshiftError(f"unknown drafter {spec!r}; choose lookup, early-exit[:L], model:PATH or auto")


def default_exit_layer(n_layers: int) -> int:
    """Measured on SmolLM2-135M (30 layers; Spec-Bench, 1 question per category): L=4 gave 0.83x,
    8: 0.68x, 12: 0.61x, 16: 0.61x, 20: 0.74x; untrained exits draft poorly, so shallow is cheapest."""
    return max(1, n_layers // 7)
