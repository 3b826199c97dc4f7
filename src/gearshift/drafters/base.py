"""What every drafter hands the verifier, and what it hears back."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from ..sampling import SamplingParams


@dataclass
class Proposal:
    """Draft tokens: a chain, or a tree when `parents` is given.

    Node 0 is the last context token (already decided); draft token i is node i + 1, and its
    parent is node `parents[i]`, always an earlier node. A chain is parents = [0, 1, 2, ...].
    """

    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V]: what each token was sampled from; None = deterministic
    parents: list[int] | None = None

    def parent_nodes(self) -> list[int]:
        return list(range(len(self.tokens))) if self.parents is None else self.parents

    def children(self) -> list[list[int]]:
        """Per node (root first): the draft indices whose parent it is, in proposal order."""
        kids: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, par in enumerate(self.parent_nodes()):
            kids[par].append(i)
        return kids

    def check(self, vocab: int) -> None:
        """Refuse a malformed proposal before it joins the shared forward, where a token id out of
        range would fail every sequence's step instead of only the drafting one's."""
        if any(not 0 <= t < vocab for t in self.tokens):
            raise ValueError(f"the drafter proposed a token id outside [0, {vocab})")
        if self.parents is not None and (
            len(self.parents) != len(self.tokens) or any(not 0 <= p <= i for i, p in enumerate(self.parents))
        ):
            raise ValueError("the drafter proposed a tree whose parents do not come before their children")

    def first(self, n: int) -> "Proposal":
        """The first n draft tokens: still a valid tree, since parents come before children."""
        return Proposal(
            self.tokens[:n],
            None if self.probs is None else self.probs[:n],
            None if self.parents is None else self.parents[:n],
        )


@dataclass
class Verdict:
    tokens: list[int]  # what the sequence grows by: the accepted draft tokens, then the target's own
    path: list[int]  # the draft indices accepted, root to leaf

    @property
    def accepted(self) -> int:
        return len(self.path)


class Drafter(Protocol):
    name: str
    length: "DraftLength"

    def fork(self) -> "Drafter":
        """A drafter for one more sequence: its own per-sequence state (context index, draft KV
        cache, draft length), sharing what is learned across sequences (Token Recycling's matrix,
        tree acceptance rates). The engine forks the drafter a request names once per sequence,
        so sequences decoded side by side never see each other's context."""

    def reset(self, prompt: list[int]) -> None:
        """A new sequence starts with `prompt`."""

    def propose(self, context: list[int], k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        """Up to k tokens that may follow `context` (prompt + everything generated so far)."""

    def observe(self, verdict: Verdict, target_logits: torch.Tensor) -> None:
        """What the target kept of the last proposal, and its logits at every proposal node."""


@dataclass
class DraftLength:
    """Online draft length: one longer after a fully accepted draft, one shorter after a miss."""

    k: int = 4
    k_min: int = 1
    k_max: int = 8

    def fresh(self) -> "DraftLength":
        return replace(self)

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.k = min(self.k + 1, self.k_max) if accepted == proposed else max(self.k - 1, self.k_min)
