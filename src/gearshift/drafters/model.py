"""Draft models: a separate small model, or the target's own first layers (early exit)."""

from __future__ import annotations

import torch

from ..kv_cache import KVCache
from ..model import ExitHead, Transformer
from ..sampling import SamplingParams, entropy, probs
from .base import DraftLength, Proposal, Verdict


class ModelDrafter:
    """A draft language model with its own KV cache, kept in step with the accepted tokens.

    `n_layers` makes it the early-exit sub-model of a larger network: the first L blocks plus the
    shared final norm and LM head. Drafting stops early when the draft's top probability falls
    below `confidence` (a draft it is unsure of would mostly be rejected anyway).
    """

    def __init__(
        self,
        model: Transformer,
        target_vocab: int,
        name: str,
        n_layers: int | None = None,
        confidence: float = 0.3,
        k_max: int = 8,
        head: ExitHead | None = None,
    ):
        self.model, self.target_vocab, self.name, self.n_layers = model, target_vocab, name, n_layers
        self.head = head  # a trained exit (gearshift distill --early-exit) instead of the final norm
        self.confidence = confidence
        self.length = DraftLength(k=4, k_min=1, k_max=k_max)
        self.cache: KVCache | None = None
        self.base = 0
        self.track_entropy = False  # entropy-adaptive decoding reads the draft's entropies
        self.entropies: list[float] = []
        self.read = 0  # tokens the draft model has run since reset: its compute, for EAD's report

    def fork(self) -> "ModelDrafter":
        """The same draft model (weights shared) with a KV cache of its own, made at `reset`."""
        other = ModelDrafter(
            self.model, self.target_vocab, self.name, self.n_layers, self.confidence, self.length.k_max, self.head
        )
        other.length, other.track_entropy = self.length.fresh(), self.track_entropy
        return other

    def reset(self, prompt: list[int]) -> None:
        need = min(self.model.cfg.max_seq_len, len(prompt) + 4096)
        if self.cache is None or self.cache.max_len < need:
            self.cache = self.model.new_cache(1, need, n_layers=self.n_layers)
        self.cache.rollback(0, 0)
        self.read = 0

    @property
    def cached(self) -> int:
        """Context tokens the draft model has read."""
        return self.cache.lengths[0]

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` after the cached ones; the next-token logits, in the target's vocabulary."""
        self.read += len(tokens)
        if self.head is None:
            logits = self.model.run(tokens, self.cache, logits_from=len(tokens) - 1, n_layers=self.n_layers)[0]
        else:
            h = self.model.run(tokens, self.cache, logits_from=len(tokens) - 1, n_layers=self.n_layers, hidden=True)
            logits = self.model.lm_head(self.head(h))[0].float()
        v = self.target_vocab  # align vocabularies: ids the target lacks are never proposed
        if logits.shape[-1] >= v:
            return logits[:v]
        return torch.cat([logits, logits.new_full((v - logits.shape[-1],), float("-inf"))])

    @torch.inference_mode()
    def propose(self, context: list[int], k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        self.base = len(context)
        if len(context) + k >= self.cache.max_len:
            return Proposal([])
        logits = self.logits(context[self.cached :])
        tokens, dists, self.entropies = [], [], []
        for i in range(k):
            q = probs(logits, params)
            t = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=gen))
            if i > 0 and float(q.max()) < self.confidence:
                break
            tokens.append(t)
            dists.append(q)
            if self.track_entropy:
                self.entropies.append(entropy(logits))
            if i + 1 < k:
                logits = self.logits([t])
        return Proposal(tokens, None if params.greedy else torch.stack(dists))

    def observe(self, verdict: Verdict, target_logits: torch.Tensor) -> None:
        # keep the context and the accepted draft tokens; the target's own token is fed next time
        self.cache.rollback(0, min(self.cached, self.base + verdict.accepted))
