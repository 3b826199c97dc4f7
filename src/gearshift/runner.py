"""The model runner: the scheduler's decisions carried out on the model and its KV cache.

The scheduler (`scheduler.py`) decides who runs and what each reads; the runner does it:

- `admit`: a new sequence's slot gets its cached prefix (copied from a busy slot, loaded from
  host memory, or already in place; what the slot held is saved to host memory first);
- `propose`: each caught-up sequence's strategy drafts into the room the scheduler left;
- `forward`: every task's rows in one `attention.Batch`, one target forward, and the slots'
  lengths moved on after it (the model itself never changes a slot's length);
- `keep`: a verified step's accepted path stays in the slot, the rest is forgotten;
- `release`: a finished sequence's slot keeps what the prefix index wants of it, or is emptied.

Device-specific paths (the native CPU kernels or PyTorch's, today; CUDA's later) are chosen once,
in `kernels.paths`, and reported here (`paths`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import kernels
from .attention import Batch, Segment
from .kv_cache import KVCache
from .model import Transformer
from .prefix_cache import Hit, PrefixCache
from .scheduler import Copy, Task
from .sequence import Sequence


@dataclass
class Forward:
    """What one target forward gave: per task its rows of logits, (when its KV policy asked) its
    rows' queries in every layer, (when its drafter reads them) every row's target features, and
    the forward's wall time."""

    logits: list[torch.Tensor]
    queries: list[list[torch.Tensor] | None]
    features: list[torch.Tensor | None]
    seconds: float


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, prefix: PrefixCache, exact: bool = True):
        self.model, self.cache, self.prefix, self.exact = model, cache, prefix, exact
        self.paths = kernels.paths(cache.k.device.type, cache.k.dtype)

    # ------------------------------------------------------------------ slots

    def admit(self, seq: Sequence, hit: Hit) -> None:
        """Put the sequence's cached prefix into its slot, as the prefix index decided."""
        cache, slot = self.cache, hit.slot
        seq.cache = cache
        if hit.reset:
            cache.reset(slot)
        if hit.evict:
            self.prefix.remember(hit.evict, cache.save(slot, len(hit.evict)))
        if hit.saved is not None:
            cache.load(slot, hit.saved.entries.to(cache.k.device), hit.found)
        elif hit.source is not None:
            cache.copy(hit.source, slot, hit.found)
        else:
            cache.rollback(slot, min(cache.tokens(slot), hit.found))
        policy = seq.kv.policy if seq.kv is not None else None
        cache.set_format(slot, policy and policy.quant, policy.recent if policy else 0)

    def copy(self, copies: list[Copy]) -> None:
        for c in copies:
            self.cache.copy(c.src, c.seq.slot, c.end, start=c.seq.computed)

    def release(self, seq: Sequence, keep: bool = True) -> None:
        """The sequence ended: its slot keeps the entries of the tokens it really holds for the prefix
        cache, unless `keep` is False (a failed sequence's entries may be half-written)."""
        if seq.slot is None:
            return
        slot, cache = seq.slot, self.cache
        if not keep:
            cache.reset(slot)
        kept = self.prefix.release(slot, seq.tokens[: min(seq.computed, len(seq.tokens))] if keep else [])
        if kept is None:
            cache.reset(slot)
        else:
            cache.rollback(slot, len(kept))
        seq.cache = None

    def held(self, seqs: list[Sequence]) -> tuple[int, int]:
        """Entries (every layer and KV head) and bytes the sequences' slots hold."""
        slots = [s.slot for s in seqs if s.slot is not None]
        return sum(map(self.cache.held, slots)), sum(map(self.cache.held_bytes, slots))

    # ------------------------------------------------------------------ a step

    def propose(self, tasks: list[Task]) -> tuple[list[Task], list[tuple[Sequence, Exception]]]:
        """Each caught-up task's drafts (its strategy proposes into the room it was given); the tasks
        that go on, and the sequences whose drafting failed (checked against the vocabulary)."""
        vocab = self.model.cfg.vocab_size
        ok, failed = [], []
        for task in tasks:
            if task.k is not None:
                try:
                    task.proposal = task.seq.strategy.propose(task.seq, task.k)
                    task.proposal.check(vocab)
                except Exception as e:
                    failed.append((task.seq, e))
                    continue
            ok.append(task)
        return ok, failed

    def forward(self, tasks: list[Task]) -> Forward:
        """One target forward over every task's rows; each slot then holds its rows' entries."""
        segments = [self._segment(t) for t in tasks]
        for seg in segments:  # sliding layers forget what no row can see any more
            self.cache.slide(seg.slot)
        batch = Batch(segments, self.cache, exact=self.exact)
        t0 = time.perf_counter()
        logits = self.model(batch, self.cache)
        seconds = time.perf_counter() - t0
        batch.advance(self.cache)
        queries: list[list[torch.Tensor] | None] = [None] * len(tasks)
        at = 0
        for i, rows in batch.capture.items():
            n = rows.stop - rows.start
            queries[i] = [q[at : at + n] for q in batch.queries]
            at += n
        features = [
            batch.features[batch.feature_rows[i]] if i in batch.feature_rows else None for i in range(len(tasks))
        ]
        return Forward([logits[rows] for rows in batch.out_slices], queries, features, seconds)

    @staticmethod
    def _segment(task: Task) -> Segment:
        seq = task.seq
        tokens = seq.tokens[task.start : task.start + task.take]
        capture, features = task.capture_from, seq.strategy.wants_features
        if task.k is None:
            return Segment(seq.slot, tokens, capture_from=capture, features=features)
        p = task.proposal
        return Segment(
            seq.slot, tokens + p.tokens, p.parents, logits_from=task.take - 1, capture_from=capture, features=features
        )

    def keep(self, seq: Sequence, root: int, nodes: list[int]) -> None:
        """After scoring a draft below the token at position `root`: keep the accepted path's entries
        (node indices, root first)."""
        self.cache.keep(seq.slot, root, nodes)
