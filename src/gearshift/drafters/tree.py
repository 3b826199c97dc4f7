"""Tree drafting: growers propose candidate trees, one drafter merges, scores and sizes them.

A grower (Token Recycling, suffix retrieval, ...) only says which continuations are plausible
and tags each node with a key (its place in a template, its branch rank and depth, ...).
`TreeDrafter` does the rest, the same way for one grower or several (hybrid):

- merge the growers' trees into one trie, so shared prefixes are scored once;
- score each node with the probability that the target accepts it, learned online per
  (grower, key) as P(node accepted | its parent accepted) times its parent's score;
- keep the n best nodes, n maximising expected tokens per second, (1 + sum of scores) / cost(n + 1),
  on the measured forward-cost curve of this model on this machine (Sequoia-style sizing).

Scores never rise from parent to child, so the n best nodes always form a tree.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..hardware import CostModel
from ..sampling import SamplingParams
from .base import DraftLength, Proposal, Verdict


class Grower(Protocol):
    name: str

    def fork(self) -> "Grower":
        """The grower for one more sequence (shared state stays shared)."""

    def reset(self, prompt: list[int]) -> None: ...

    def grow(self, context: list[int], limit: int) -> tuple[list[int], list[int], list]:
        """Candidate tree after `context`: (tokens, parent nodes as in Proposal, a key per node)."""

    def learn(self, tree: list[int], target_logits: torch.Tensor) -> None:
        """The verified tree's tokens (root first) and the target's logits at each of its nodes."""


class AcceptanceStats:
    """Running P(node accepted | parent accepted) per key: a Beta(1, 1) prior and counts that fade
    by `decay` per verification step. Fading is also what keeps exploring: a kind of node that
    went out of the trees drifts back towards the prior until it is tried again."""

    def __init__(self, decay: float = 0.99):
        self.decay = decay
        self.step = 0
        self.counts: dict = {}  # key -> (hits, trials, step of the last update)

    def _faded(self, key) -> tuple[float, float]:
        hits, trials, step = self.counts.get(key, (0.0, 0.0, self.step))
        f = self.decay ** (self.step - step)
        return hits * f, trials * f

    def rate(self, key) -> float:
        hits, trials = self._faded(key)
        return (hits + 1.0) / (trials + 2.0)

    def update(self, key, hit: bool) -> None:
        hits, trials = self._faded(key)
        self.counts[key] = (hits + hit, trials + 1.0, self.step)


class TreeDrafter:
    def __init__(
        self,
        name: str,
        growers: list[Grower],
        costs: CostModel | None = None,
        max_nodes: int = 64,
        stats: AcceptanceStats | None = None,
    ):
        self.name, self.growers, self.costs = name, growers, costs
        self.length = DraftLength(k=max_nodes, k_min=max_nodes, k_max=max_nodes)  # sized per step instead
        self.stats = stats or AcceptanceStats()  # shared by every fork: what each kind of node is worth
        self.last: tuple[list[int], list[int], list[list]] = ([], [], [])  # tokens (root first), parents, sources

    def fork(self) -> "TreeDrafter":
        return TreeDrafter(self.name, [g.fork() for g in self.growers], self.costs, self.length.k_max, self.stats)

    def reset(self, prompt: list[int]) -> None:
        for g in self.growers:
            g.reset(prompt)

    def propose(self, context: list[int], k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        tokens, parents, sources, index = [], [], [], {}
        scores = [1.0]  # per node, root first
        for g in self.growers:
            g_tokens, g_parents, g_keys = g.grow(context, self.length.k_max)
            where = [0]  # grower node -> merged node
            for t, par, key in zip(g_tokens, g_parents, g_keys):
                parent = where[par]
                rate = self.stats.rate((g.name, key))
                node = index.get((parent, t))
                if node is None:
                    node = index[(parent, t)] = len(tokens) + 1
                    tokens.append(t)
                    parents.append(parent)
                    sources.append([])
                    scores.append(0.0)
                sources[node - 1].append((g.name, key))
                scores[node] = max(scores[node], scores[parent] * rate)
                where.append(node)
        keep = self._size(scores[1:], min(k, len(tokens)))
        remap = {0: 0} | {old + 1: new + 1 for new, old in enumerate(keep)}
        kept = [tokens[i] for i in keep]
        self.last = ([context[-1]] + kept, [remap[parents[i]] for i in keep], [sources[i] for i in keep])
        return Proposal(kept, parents=self.last[1])

    def _size(self, scores: list[float], k: int) -> list[int]:
        """Indices (in tree order) of the nodes to verify: the best n, or the first k without a cost curve."""
        if self.costs is None:
            return list(range(k))
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        gain = 1.0 + np.concatenate([[0.0], np.cumsum([scores[i] for i in order])])
        rate = [gain[n] / self.costs(n + 1) for n in range(len(order) + 1)]
        return sorted(order[: int(np.argmax(rate))])

    def save(self) -> None:
        """Write what the growers learned to the files they were loaded from (recycling:PATH)."""
        for g in self.growers:
            if getattr(g, "path", None):
                g.save(g.path)

    def observe(self, verdict: Verdict, target_logits: torch.Tensor) -> None:
        tokens, parents, sources = self.last
        self.stats.step += 1
        accepted = {0} | {i + 1 for i in verdict.path}
        for i, (par, srcs) in enumerate(zip(parents, sources)):
            if par in accepted:  # the node was really put to the test
                for key in srcs:
                    self.stats.update(key, i + 1 in accepted)
        for g in self.growers:
            g.learn(tokens, target_logits)
