"""Turning logits into tokens.

`probs` is the single definition of "the distribution we sample from" (temperature, then
top-k, then top-p, as in transformers); speculative decoding applies the same function to the
target and the draft so that rejection sampling stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import GearshiftError

# Below this a temperature is greedy decoding (vLLM's rule): dividing logits by 1e-40 overflows to
# inf and the softmax to NaN, and anything this cold is argmax in all but float rounding anyway.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: its log-probability and the top-N alternatives

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (
                isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                f"max_tokens must be a positive integer, got {self.max_tokens!r}",
            ),
            (
                isinstance(self.temperature, (int, float))
                and math.isfinite(self.temperature)
                and self.temperature >= 0,
                f"temperature must be a finite number >= 0, got {self.temperature!r}",
            ),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}"),
            (
                isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
                f"top_p must be in (0, 1], got {self.top_p!r}",
            ),
            (
                self.seed is None
                or (
                    isinstance(self.seed, int)
                    and not isinstance(self.seed, bool)
                    and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]
                ),
                f"seed must be an integer from -2**63 to 2**64 - 1, got {self.seed!r}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (
                self.logprobs is None
                or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool) and self.logprobs >= 0),
                f"logprobs must be an integer >= 0, got {self.logprobs!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise GearshiftError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The sampling distribution over the last dim (float32); one-hot argmax when greedy."""
    logits = logits.float()
    if p.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), -math.inf)
    return logits.softmax(-1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` [B, V]."""
    if p.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probs(logits, p), 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def entropy(logits: torch.Tensor) -> float:
    """Of the model's own next-token distribution (temperature 1), in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).nan_to_num().sum())
