"""A request, and the sequence the engine core makes of it: everything one generation owns.

A `Sequence` holds its token ids (prompt + generated), its sampling parameters and random
generator, its strategy (plain, speculative, entropy-adaptive), its stop rules and text state,
its place in the KV cache (slot, and how many of its tokens the cache holds) and its stats.
`EngineCore.step` returns a `StepOutput` per sequence that moved; the last one of a sequence
carries its `Completion`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .kv_policy import KVPolicy, KVState
from .sampling import SamplingParams, make_generator
from .stats import SequenceStats, Timing
from .tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
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
    metrics: dict = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[Logprob] | None = None  # per generated token, when asked for
    strategy: str = "plain"
    error: str | None = None  # why the sequence failed (finish reason "error"); others are unaffected


@dataclass
class StepOutput:
    """What one step did for one sequence."""
    seq_id: int
    token_ids: list[int]
    text: str
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None
    completion: Completion | None = None  # set on the sequence's last output


class TextState:
    """Per-sequence detokenization and stop-string handling.

    Text that might be the start of a stop string is held back, so a stream never shows a
    stop string it later has to take back.
    """

    def __init__(self, tok: Tokenizer, prompt_ids: list[int], stop: list[str]):
        self.detok = IncrementalDetokenizer(tok, prompt_ids)
        self.stop = stop
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.text += self.detok.push([token])
        safe = len(self.text)
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
                safe = at
                break
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):  # a stop string may be starting
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        safe = max(safe, self.emitted)
        delta = self.text[self.emitted:safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        if not self.stopped:
            self.text += self.detok.flush()
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta


class Sequence:
    def __init__(self, seq_id: int, request: Request, tokenizer: Tokenizer, window: int, device: torch.device):
        self.id, self.request = seq_id, request
        self.params = request.params
        self.prompt_len = len(request.prompt)
        self.tokens = list(request.prompt)  # prompt + generated
        self.kv = KVState(request.kv) if request.kv is not None and request.kv.active else None
        # a slot holds `window` positions; streaming keeps dropping old ones, so it can go on past that
        unbounded = self.kv is not None and self.kv.policy.name == "streaming"
        self.max_new = self.params.max_tokens if unbounded else min(self.params.max_tokens, window - self.prompt_len)
        self.gen = make_generator(self.params.seed, device)
        self.text = TextState(tokenizer, request.prompt, self.params.stop)
        self.logprobs: list[Logprob] | None = None if self.params.logprobs is None else []
        self.strategy: Strategy | None = None  # made when the sequence gets a slot
        self.slot: int | None = None
        self.computed = 0  # leading tokens whose keys and values the slot holds
        self.finish_reason: str | None = None
        self.error: str | None = None  # set when its own work raised (`EngineCore._fail`)
        self.stats = SequenceStats(Timing(request.arrival), prompt_tokens=self.prompt_len)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def lag(self) -> int:
        """Known tokens the target has not read yet (the prompt at first, then the last token)."""
        return len(self.tokens) - self.computed

    @property
    def remaining(self) -> int:
        """Tokens the sequence may still produce."""
        return self.max_new - (len(self.tokens) - self.prompt_len)

    def completion(self) -> Completion:
        return Completion(self.text.text, self.generated, self.prompt_len, self.finish_reason or "length",
                          self.stats.as_dict(), self.stats.cached_tokens, self.logprobs,
                          self.strategy.name if self.strategy is not None else "plain", self.error)
