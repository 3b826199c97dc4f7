"""Token Recycling (Luo et al. 2024): the target's own runner-up predictions become the drafts.

Every verification scores a whole tree, and for every node the target ranks the whole
vocabulary: the top-k of those rankings are recycled into an adjacency matrix (token -> its k
likeliest successors, as last seen), rejected nodes included. A draft tree is then grown from the
last token by matrix look-ups along a static template. The matrix is int32 [vocab, k]: 1.5 MB
for a 49,152-token vocabulary at k = 8, and it can be saved and warm-started.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import torch

from ..errors import GearshiftError
from ..hub import atomic_file

RANK_PRIOR = (0.45, 0.15, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02)  # P(accept) of the r-th successor, a rough prior


def template(size: int = 64, k: int = 8, max_depth: int = 8) -> list[tuple[int, int]]:
    """A static tree as (parent node, successor rank) per node, nodes 1..size (0 is the root).

    Grown best-first under RANK_PRIOR, so a node's prior is its path's product: the BFS-like,
    wide-at-the-top shape of the paper's tree. Nodes come in decreasing prior, parents first.
    """
    nodes: list[tuple[int, int]] = []
    depth = [0]
    heap = [(-RANK_PRIOR[r], 0, r) for r in range(k)]
    while heap and len(nodes) < size:
        neg, parent, rank = heapq.heappop(heap)
        nodes.append((parent, rank))
        depth.append(depth[parent] + 1)
        if depth[-1] < max_depth:
            for r in range(k):
                heapq.heappush(heap, (neg * RANK_PRIOR[r], len(nodes), r))
    return nodes


class Recycling:
    name = "recycling"

    def __init__(self, vocab: int, k: int = 8, path: str | Path | None = None, size: int = 64):
        self.k, self.template = k, template(size, k)
        self.adjacency = np.full((vocab, k), -1, dtype=np.int32)  # -1: no successor seen yet
        self.path = path  # warm-started from, and saved back to
        if path is not None and Path(path).exists():
            self.load(path)

    def fork(self) -> "Recycling":
        return self  # nothing per sequence: every sequence reads and grows the one matrix

    def reset(self, prompt: list[int]) -> None:
        pass  # the matrix carries over between sequences: that is the warm start

    def grow(self, context: list[int], limit: int) -> tuple[list[int], list[int], list]:
        tokens, parents, keys = [], [], []
        node_of = {0: 0}  # template node -> proposal node (absent: its parent had no successor)
        token_of = {0: context[-1]}
        for i, (parent, rank) in enumerate(self.template[:limit], start=1):
            if parent not in node_of:
                continue
            t = int(self.adjacency[token_of[parent], rank])
            if t < 0:
                continue
            tokens.append(t)
            parents.append(node_of[parent])
            keys.append(i)
            node_of[i], token_of[i] = len(tokens), t
        return tokens, parents, keys

    def learn(self, tree: list[int], target_logits: torch.Tensor) -> None:
        top = target_logits.topk(self.k, dim=-1).indices.to(torch.int32).cpu().numpy()
        self.adjacency[np.asarray(tree)] = top

    def save(self, path: str | Path) -> None:
        with atomic_file(Path(path)) as f:
            np.save(f, self.adjacency)

    def load(self, path: str | Path) -> None:
        try:
            adj = np.load(path)
        except (OSError, ValueError) as e:
            raise GearshiftError(f"cannot read the recycling matrix {path}: {e}") from None
        if adj.shape != self.adjacency.shape or adj.dtype != np.int32:
            raise GearshiftError(
                f"{path} holds a {adj.shape} {adj.dtype} matrix, this model needs {self.adjacency.shape} int32"
            )
        self.adjacency = adj
