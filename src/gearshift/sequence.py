"""A request, and the sequence the engine core makes of it: everything one generation owns.

A `Sequence` holds its token ids (prompt + generated), its sampling parameters and random
generator, its strategy (plain, speculative, entropy-adaptive), its stop rules and text state,
its status, its place in the KV cache (a slot; how many of its tokens the slot holds is the
slot's own count, read through `computed`) and its typed stats.
`EngineCore.step` returns a `StepOutput` per sequence that moved; the last one of a sequence
carries its `Completion`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .kv_policy import KVPolicy, KVState
from .sampling import SamplingParams, make_generator
from .stats import SequenceStats, Timing

if TYPE_CHECKING:
    from .kv_cache import KVCache
    from .output import TextState
    from .strategies import Strategy


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    strategy: Callable[[], "Strategy"]  # makes the per-sequence strategy when the sequence starts
    arrival: float = field(default_factory=time.perf_counter)
    kv: KVPolicy | None = None  # which cache entries to keep (None: all)


@dataclass
class Logprob:
    """One token's log-probability, in the shape of OpenAI's `logprobs.content` entries (plus its id)."""

    id: int
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list["Logprob"] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length", "abort" or "error" (see `error`)
    stats: SequenceStats | None = None  # typed: timing, work, speculation, EAD cost, KV cache
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[Logprob] | None = None  # per generated token, when asked for
    strategy: str = "plain"
    error: str | None = None  # why the sequence failed (finish reason "error"); others are unaffected

    @property
    def metrics(self) -> dict:
        """The stats as one flat dict (`SequenceStats.as_dict`): what JSON reports and people read."""
        return self.stats.as_dict() if self.stats is not None else {}


@dataclass
class StepOutput:
    """What one step did for one sequence."""

    seq_id: int
    token_ids: list[int]
    text: str
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None
    completion: Completion | None = None  # set on the sequence's last output


class Status(enum.Enum):
    """Where a sequence is in its life (`Sequence.status`); a finished one has a finish reason."""

    WAITING = "waiting"  # queued for a KV cache slot
    PREFILLING = "prefilling"  # in a slot, reading its prompt (no token yet)
    DECODING = "decoding"  # producing tokens
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, request: Request, window: int, device: torch.device):
        self.id, self.request = seq_id, request
        self.params = request.params
        self.prompt_len = len(request.prompt)
        self.tokens = list(request.prompt)  # prompt + generated
        self.kv = KVState(request.kv) if request.kv is not None and request.kv.active else None
        # a slot holds `window` positions; streaming keeps dropping old ones, so it can go on past that
        unbounded = self.kv is not None and self.kv.unbounded
        self.max_new = self.params.max_tokens if unbounded else min(self.params.max_tokens, window - self.prompt_len)
        self.gen = make_generator(self.params.seed, device)
        self.text: TextState | None = None  # stop strings and detokenizer (`output.Outputs.start`)
        self.logprobs: list[Logprob] | None = None if self.params.logprobs is None else []
        self.strategy: Strategy | None = None  # made when the sequence gets a slot
        self.status = Status.WAITING
        self.slot: int | None = None
        self.cache: KVCache | None = None  # while it holds a slot (the model runner sets it)
        self.finish_reason: str | None = None
        self.error: str | None = None  # set when its own work raised (`EngineCore._fail`)
        self.stats = SequenceStats(Timing(request.arrival), prompt_tokens=self.prompt_len)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def computed(self) -> int:
        """Leading tokens whose keys and values its slot holds: the slot's own count (`KVCache.tokens`),
        kept in one place; 0 outside a slot."""
        return self.cache.tokens(self.slot) if self.cache is not None else 0

    @property
    def lag(self) -> int:
        """Known tokens the target has not read yet (the prompt at first, then the last token)."""
        return len(self.tokens) - self.computed

    @property
    def remaining(self) -> int:
        """Tokens the sequence may still produce."""
        return self.max_new - (len(self.tokens) - self.prompt_len)

    def completion(self) -> Completion:
        return Completion(
            self.text.text if self.text is not None else "",
            self.generated,
            self.prompt_len,
            self.finish_reason or "length",
            self.stats,
            self.stats.cached_tokens,
            self.logprobs,
            self.strategy.name if self.strategy is not None else "plain",
            self.error,
        )
