"""The one verification routine every drafter goes through.

The target scores `[last token] + draft` in one forward pass; this module decides what to keep.
Greedy: the longest draft prefix that equals the target's argmax, then the target's own next
token. Sampling: the rejection rule of Leviathan et al. 2023 / Chen et al. 2023 — accept draft
token d with probability min(1, p(d) / q(d)), otherwise sample from the residual
max(0, p - q) renormalised — which leaves the output distributed exactly as the target's.
A deterministic drafter's q is one-hot.
"""

from __future__ import annotations

import torch

from .drafters import Proposal
from .sampling import SamplingParams, probs


def accept_probability(p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    return torch.clamp(p_d / q_d, max=1.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r = torch.clamp(p - q, min=0.0)
    total = r.sum()
    return r / total if total > 0 else p  # p == q up to rounding: nothing to correct


def verify(target_logits: torch.Tensor, proposal: Proposal, params: SamplingParams,
           gen: torch.Generator) -> tuple[list[int], int]:
    """target_logits: [len(draft) + 1, V]. Returns (tokens to append, draft tokens accepted)."""
    draft = proposal.tokens
    if params.greedy:
        best = target_logits.argmax(-1).tolist()
        n = 0
        while n < len(draft) and draft[n] == best[n]:
            n += 1
        return draft[:n] + [best[n]], n
    p = probs(target_logits, params)
    for i, d in enumerate(draft):
        q = proposal.probs[i] if proposal.probs is not None else torch.nn.functional.one_hot(
            torch.tensor(d), p.shape[-1]).to(p.dtype)
        u = torch.rand((), generator=gen, device=gen.device)
        if u < accept_probability(p[i, d], q[d]):
            continue
        return draft[:i] + [int(torch.multinomial(residual(p[i], q), 1, generator=gen))], i
    return draft + [int(torch.multinomial(p[len(draft)], 1, generator=gen))], len(draft)
