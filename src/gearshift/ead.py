"""Entropy Adaptive Decoding: spend the large model only where the small one is unsure.

A rolling window of the prediction entropy decides who writes the next token: the small model
until the window's mean rises above tau, the large one until it falls back below (each switch
held for at least `min_run` tokens, so the schedule does not flap). A model that sat idle
catches up with one batched forward over the tokens it missed.

`ead` keeps the small model's tokens as they are: cheap, lossy. `ead+verify` runs the same
schedule as speculative decoding: while the small model is in charge its tokens are drafts the
large one verifies, so the output is the large model's at any tau, and tau only decides when
drafting is worth trying.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .drafters import ModelDrafter, Proposal, Verdict
from .errors import GearshiftError
from .model import Transformer
from .sampling import SamplingParams, entropy


@dataclass
class EAD:
    small: str = "early-exit"  # a drafter spec naming a model: early-exit[:L] or model:PATH
    tau: float = 2.0  # nats
    window: int = 5
    min_run: int = 4
    verify: bool = False  # ead+verify: lossless

    def __post_init__(self):
        if self.tau < 0 or self.window < 1 or self.min_run < 1:
            raise GearshiftError("ead needs tau >= 0, window >= 1 and min_run >= 1")


class Schedule:
    """Which model writes next, from the rolling mean of the entropies pushed so far."""

    def __init__(self, cfg: EAD):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self.large = self.cfg.tau == 0  # tau 0: the large model throughout
        self.run = 0
        self.recent: deque[float] = deque(maxlen=self.cfg.window)

    def push(self, h: float) -> None:
        self.recent.append(h)
        self.run += 1
        mean = sum(self.recent) / len(self.recent)
        if self.run >= self.cfg.min_run and (mean > self.cfg.tau) != self.large:
            self.large, self.run = not self.large, 0


def forward_flops(model: Transformer, n_layers: int | None = None) -> float:
    """Multiply-adds x 2 per token of the blocks used and the LM head (attention scores left out)."""
    c = model.cfg
    block = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.hidden_dim
    return 2.0 * ((n_layers or c.n_layers) * block + c.vocab_size * c.dim)


class EntropyGate:
    """`ead+verify`'s drafter: the small model drafts only while the schedule gives it the turn.

    Entropies go into the schedule one per produced token: the small model's for the draft
    tokens the large one accepted, the large model's for the token it wrote itself.
    """

    def __init__(self, inner: ModelDrafter, cfg: EAD):
        self.inner, self.cfg, self.schedule = inner, cfg, Schedule(cfg)
        self.name, self.length = f"ead+verify:{inner.name}", inner.length
        inner.track_entropy = True
        self.drafted = 0

    def fork(self) -> "EntropyGate":
        return EntropyGate(self.inner.fork(), self.cfg)

    def reset(self, prompt: list[int]) -> None:
        self.inner.reset(prompt)
        self.schedule.reset()

    def propose(self, context: list[int], k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        proposal = Proposal([]) if self.schedule.large else self.inner.propose(context, k, params, gen)
        self.drafted = len(proposal.tokens)
        return proposal

    def observe(self, verdict: Verdict, target_logits: torch.Tensor) -> None:
        for h in self.inner.entropies[: verdict.accepted]:
            self.schedule.push(h)
        self.schedule.push(entropy(target_logits[verdict.accepted]))
        if self.drafted:  # otherwise the small model sat this step out; it catches up when drafting again
            self.inner.observe(verdict, target_logits)
