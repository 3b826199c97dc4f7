"""The one verification routine every drafter goes through, for chains and trees alike.

The target scores `[last token] + draft` in one forward pass (a tree with a tree-shaped
attention); this module decides what to keep, walking from the root:

- greedy: move to the child whose token is the target's argmax; stop where there is none, and
  append the target's own argmax there;
- sampling: try the children in order with the rejection rule of Leviathan et al. 2023 /
  Chen et al. 2023, generalised to siblings as in SpecInfer / Recursive Speculative Decoding:
  accept child d with probability min(1, p(d) / q(d)); after a rejection, p becomes the residual
  max(0, p - q) renormalised and the next sibling is tried against it; when every child is
  rejected, sample from what is left. The output is distributed exactly as the target's.
  A deterministic drafter's q is one-hot, so a rejected candidate is simply taken out of p.
"""

from __future__ import annotations

import torch

from .drafters import Proposal, Verdict
from .sampling import SamplingParams, probs


def accept_probability(p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    return torch.clamp(p_d / q_d, max=1.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r = torch.clamp(p - q, min=0.0)
    total = r.sum()
    return r / total if total > 0 else p  # p == q up to rounding: nothing to correct


def verify(target_logits: torch.Tensor, proposal: Proposal, params: SamplingParams, gen: torch.Generator) -> Verdict:
    """target_logits: [len(draft) + 1, V], root first. Returns what to append and the accepted path."""
    draft, children = proposal.tokens, proposal.children()
    best = target_logits.argmax(-1).tolist() if params.greedy else None
    p = None if params.greedy else probs(target_logits, params)
    node, path = 0, []
    while True:
        chosen = None
        if params.greedy:
            chosen = next((c for c in children[node] if draft[c] == best[node]), None)
            if chosen is None:
                return Verdict([draft[i] for i in path] + [best[node]], path)
        else:
            dist = p[node]
            for c in children[node]:
                d = draft[c]
                q = (
                    proposal.probs[c]
                    if proposal.probs is not None
                    else torch.nn.functional.one_hot(torch.tensor(d), dist.shape[-1]).to(dist.dtype)
                )
                if torch.rand((), generator=gen, device=gen.device) < accept_probability(dist[d], q[d]):
                    chosen = c
                    break
                dist = residual(dist, q)
            if chosen is None:
                return Verdict([draft[i] for i in path] + [int(torch.multinomial(dist, 1, generator=gen))], path)
        path.append(chosen)
        node = chosen + 1
