"""Admission and the per-step token budget: which sequences run, and what each reads this step.

Sequences wait in arrival order until a KV cache slot is free (at most `max_num_seqs` run at
once); a new one takes the slot holding the longest cached prefix of its prompt (`PrefixCache`).
Every step then shares `max_batched_tokens` rows between the running sequences, decoding ones
first (oldest first; a decode row is never held back, drafts take what the budget leaves), then
prompts, in chunks: a long prompt is read over several steps while the others keep decoding,
and a sequence that joins mid-way simply has its chunks in the next step's batch. Chunk sizes
change nothing in the results, since every row is computed exactly (`attention.py`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .attention import Segment
from .drafters import Proposal
from .errors import GearshiftError
from .prefix_cache import PrefixCache, common_prefix
from .sequence import Sequence


@dataclass
class EngineConfig:
    max_num_seqs: int = 8  # sequences decoded side by side (KV cache slots)
    max_batched_tokens: int = 256  # rows per step: decode rows and drafts first, then prompt chunks
    max_model_len: int | None = None  # a slot's positions (default: the model's context window)
    prefix_cache: bool = True
    prefix_cache_bytes: int = 1 << 30  # host memory for evicted prefixes
    exact: bool = True  # False: batched attention per sequence (attention.Batch), not batch-invariant

    def __post_init__(self):
        for name in ("max_num_seqs", "max_batched_tokens", "prefix_cache_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "prefix_cache_bytes" else 1):
                raise GearshiftError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.exact, bool):
            raise GearshiftError(f"exact must be True or False, got {self.exact!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise GearshiftError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.max_batched_tokens < self.max_num_seqs:  # else decode rows alone could starve every prompt
            raise GearshiftError(f"max_batched_tokens ({self.max_batched_tokens}) must be at least max_num_seqs "
                                 f"({self.max_num_seqs})")


@dataclass
class Task:
    """One sequence's part of a step: `take` of the tokens the target has not read, and, when that
    catches it up, the proposal scored after them (it then gets logits and tokens this step)."""
    seq: Sequence
    take: int
    proposal: Proposal | None

    @property
    def segment_capture(self) -> int | None:
        seq = self.seq
        return seq.kv.capture_from(seq.computed, self.take, seq.prompt_len) if seq.kv is not None else None

    @property
    def segment(self) -> Segment:
        seq, p = self.seq, self.proposal
        tokens = seq.tokens[seq.computed:seq.computed + self.take]
        capture = self.segment_capture
        if p is None:
            return Segment(seq.slot, tokens, capture_from=capture)
        return Segment(seq.slot, tokens + p.tokens, p.parents, logits_from=self.take - 1, capture_from=capture)


class Scheduler:
    def __init__(self, config: EngineConfig, prefix: PrefixCache, max_len: int, vocab: int):
        self.config, self.prefix, self.max_len, self.vocab = config, prefix, max_len, vocab
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def admit(self) -> list[Sequence]:
        """Give waiting sequences free slots, oldest first; returns the ones admitted."""
        admitted = []
        while self.waiting and self.prefix.free_slots:
            seq = self.waiting.popleft()
            seq.slot, seq.computed = self.prefix.assign(seq.tokens, seq)
            seq.stats.cached_tokens = seq.computed
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self) -> tuple[list[Task], list[Sequence], list[tuple[Sequence, Exception]]]:
        """This step's tasks for the target forward, the sequences that decode without it, and those
        whose strategy failed to propose (the core ends them; the others go on)."""
        budget = self.config.max_batched_tokens
        tasks, alone, failed = [], [], []
        reach: dict[int, int] = {}  # tokens each sequence will hold after this step
        for seq in sorted(self.running, key=lambda s: (s.stats.timing.first_token is None, s.id)):
            if not seq.strategy.uses_target(seq):
                alone.append(seq)
                continue
            if seq.computed < seq.prompt_len and self.prefix.enabled and not self.prefix.cache.compacted[seq.slot] \
                    and self._share(seq, reach):
                continue  # another sequence computes this one's next tokens in this step: copy them next step
            lag = seq.lag
            take = lag if lag == 1 else min(lag, budget)
            if take <= 0:
                continue
            proposal = None
            if take == lag:
                k_max = min(seq.remaining - 1, budget - take, self.max_len - len(seq.tokens))
                try:
                    proposal = seq.strategy.propose(seq, max(0, k_max))
                    proposal.check(self.vocab)
                except Exception as e:
                    failed.append((seq, e))
                    continue
            budget -= take + (len(proposal.tokens) if proposal is not None else 0)
            reach[seq.id] = seq.computed + take
            tasks.append(Task(seq, take, proposal))
        return tasks, alone, failed

    def _share(self, seq: Sequence, reach: dict[int, int]) -> bool:
        """A prompt still being read may share its next tokens with another running sequence (a
        system prompt; requests that arrived together): copy what that one already holds, and
        wait a step if it is computing more of them now. Returns whether to wait."""
        limit, held, soon, source = len(seq.tokens) - 1, seq.computed, seq.computed, None
        for other in self.running:
            if other is seq or other.slot is None or self.prefix.cache.compacted[other.slot]:
                continue  # (a slot whose policy dropped entries holds no exact prefix)
            n = min(limit, common_prefix(other.tokens, seq.tokens))
            if min(n, other.computed) > held:
                held, source = min(n, other.computed), other
            soon = max(soon, min(n, reach.get(other.id, other.computed)))
        if source is not None and held - seq.computed >= self.prefix.min_tokens:
            self.prefix.share(source.slot, seq.slot, seq.computed, held)
            seq.stats.cached_tokens += held - seq.computed
            seq.computed = held
        return soon - seq.computed >= self.prefix.min_tokens

    def remove(self, seq: Sequence, keep: bool = True) -> None:
        """Take a sequence out (finished or aborted); a running one's slot keeps its entries for the
        prefix cache (the tokens whose entries the slot really holds), unless `keep` is False."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq not in self.running:
            return
        self.running.remove(seq)
        if not keep:
            self.prefix.cache.reset(seq.slot)
        self.prefix.release(seq.slot, seq.tokens[:min(seq.computed, len(seq.tokens))] if keep else [])
