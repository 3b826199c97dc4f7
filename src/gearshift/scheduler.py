"""Admission and the per-step token budget: which sequences run, and what each reads this step.

The scheduler only decides; the model runner (`runner.py`) carries its decisions out.

Sequences wait in arrival order until a KV cache slot is free (at most `max_num_seqs` run at
once); a new one takes the slot holding the longest cached prefix of its prompt (the prefix
index, `prefix_cache.py`). Every step then shares `max_batched_tokens` rows between the running
sequences, decoding ones first (oldest first; a decode row is never held back, and room for a
draft is kept from what the budget leaves), then prompts, in chunks: a long prompt is read over
several steps while the others keep decoding, and a sequence that joins mid-way simply has its
chunks in the next step's batch. Chunk sizes change nothing in the results, since every row is
computed exactly (`attention.py`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .config import EngineConfig
from .drafters import Proposal
from .prefix_cache import Hit, PrefixCache, common_prefix
from .sequence import Sequence, Status


@dataclass
class Task:
    """One sequence's part of a step: `take` of the tokens the target has not read, from token
    position `start` on, and, when that catches it up, room for `k` draft tokens scored after them
    (it then gets logits and tokens this step)."""

    seq: Sequence
    start: int
    take: int
    k: int | None = None  # None: a chunk of what it has to read, no logits
    proposal: Proposal | None = None  # the runner's drafts (an empty one: nothing proposed)
    accepted: list[int] = field(default_factory=list)  # the draft indices verification kept, root to leaf

    @property
    def capture_from(self) -> int | None:
        """The first of its rows whose queries its KV policy keeps (None: none)."""
        seq = self.seq
        return seq.kv.capture_from(self.start, self.take, seq.prompt_len) if seq.kv is not None else None


@dataclass
class Copy:
    """Positions seq.computed..end of a running sequence's slot `src` go to `seq`'s slot first (a
    prefix two prompts share)."""

    seq: Sequence
    src: int
    end: int


@dataclass
class Plan:
    tasks: list[Task] = field(default_factory=list)  # rows for the target forward
    alone: list[Sequence] = field(default_factory=list)  # sequences that decode without it (lossy EAD)
    copies: list[Copy] = field(default_factory=list)  # carried out before the forward


class Scheduler:
    def __init__(self, config: EngineConfig, prefix: PrefixCache, max_len: int):
        self.config, self.prefix, self.max_len = config, prefix, max_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def admit(self) -> list[tuple[Sequence, Hit]]:
        """Give waiting sequences free slots, oldest first; returns the ones admitted and their prefix hits."""
        admitted = []
        while self.waiting and self.prefix.slots.free_count:
            seq = self.waiting.popleft()
            hit = self.prefix.lookup(seq.tokens, seq)
            seq.slot, seq.status = hit.slot, Status.PREFILLING
            seq.stats.cached_tokens = hit.found
            self.running.append(seq)
            admitted.append((seq, hit))
        return admitted

    def plan(self) -> Plan:
        """This step's tasks for the target forward, the sequences that decode without it, and the
        prefix copies to make first."""
        budget = self.config.max_batched_tokens
        plan = Plan()
        reach: dict[int, int] = {}  # tokens each sequence will hold after this step
        for seq in sorted(self.running, key=lambda s: (s.status is Status.PREFILLING, s.id)):
            if not seq.strategy.uses_target(seq):
                plan.alone.append(seq)
                continue
            start = seq.computed
            if start < seq.prompt_len and self.prefix.enabled and not self.prefix.cache.compacted[seq.slot]:
                wait, copy = self._share(seq, reach)
                if copy is not None:
                    plan.copies.append(copy)
                    start = copy.end
                if wait:
                    continue  # another sequence computes this one's next tokens in this step
            lag = len(seq.tokens) - start
            take = lag if lag == 1 else min(lag, budget)
            if take <= 0:
                continue
            k = None
            if take == lag:  # caught up: logits this step, and room for a draft
                k = max(
                    0,
                    min(seq.strategy.draft_room(seq, budget - take), seq.remaining - 1, self.max_len - len(seq.tokens)),
                )
                if seq.kv is not None and (room := seq.kv.draft_room(self.prefix.cache, seq.slot)) is not None:
                    k = min(k, room)  # not past the token after which its policy drops entries
            budget -= take + (k or 0)
            reach[seq.id] = start + take
            plan.tasks.append(Task(seq, start, take, k))
        return plan

    def _share(self, seq: Sequence, reach: dict[int, int]) -> tuple[bool, Copy | None]:
        """A prompt still being read may share its next tokens with another running sequence (a
        system prompt; requests that arrived together): copy what that one already holds, and
        wait a step if it is computing more of them now. Returns whether to wait, and the copy."""
        limit, held, soon, source = len(seq.tokens) - 1, seq.computed, seq.computed, None
        for other in self.running:
            if other is seq or other.slot is None or self.prefix.cache.compacted[other.slot]:
                continue  # (a slot whose policy dropped entries holds no exact prefix)
            n = min(limit, common_prefix(other.tokens, seq.tokens))
            front, resumable = self.prefix.cache.front[other.slot], self.prefix.cache.resumable
            if min(n, other.computed) > held and resumable(front, min(n, other.computed)):
                held, source = min(n, other.computed), other  # (sliding layers: while the window is held)
            if resumable(front, m := min(n, reach.get(other.id, other.computed))):
                soon = max(soon, m)
        copy = None
        if source is not None and held - seq.computed >= self.prefix.min_tokens:
            seq.stats.cached_tokens += held - seq.computed
            self.prefix.shared(held - seq.computed)
            copy = Copy(seq, source.slot, held)
        return soon - (copy.end if copy else seq.computed) >= self.prefix.min_tokens, copy

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted); the runner releases its slot."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
