"""The prefix cache: a new sequence starts from the longest prefix of its prompt whose keys and
values are already computed somewhere.

Three places can hold such a prefix (llama.cpp's per-slot longest common prefix, plus a host LRU):
- a free slot: a finished sequence's entries stay in its slot; a new sequence whose prompt
  continues it (the next turn of a chat) takes that slot and reads only what is new;
- a busy slot: a running sequence that shares a prefix (a system prompt, the same document) has
  its entries copied into the new sequence's slot;
- the host LRU: before a free slot's entries are overwritten they are copied to host memory,
  least recently used first out, within a byte budget; a hit is copied back into the slot.

A slot whose sequence had entries dropped by a KV policy (`kv_policy.py`) holds no exact prefix,
so it is never copied; only the next turn of the same conversation under the same policy may
continue it in place (its prompt extends everything the slot went through), which is how a
compressed cache serves a follow-up (SCBench's multi-turn mode). Anything else resets it.

Reuse is exact: attention is row-exact (`attention.py`), so a position's entries depend only on
the tokens up to it, never on how they were computed. The prompt's last token is always read
again, since its logits give the first new token. A slot's content is a list of tokens whose
entries it holds; a busy slot's is read from its sequence (tokens[:computed]) when asked, so it
is never stale after a rollback.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import torch

from .kv_cache import KVCache


class Holder(Protocol):
    """What a busy slot's owner exposes: its tokens, the first `computed` of them cached, and its
    KV policy state (None: a full cache)."""
    tokens: list[int]
    computed: int
    kv: object | None


@dataclass
class _Saved:
    tokens: list[int]
    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (list slices compare in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    def __init__(self, cache: KVCache, budget_bytes: int = 1 << 30, enabled: bool = True, min_tokens: int = 16):
        self.cache, self.budget, self.enabled, self.min_tokens = cache, budget_bytes, enabled, min_tokens
        self.contents: list[list[int]] = [[] for _ in range(cache.slots)]  # what each free slot holds
        self.policies: list[object | None] = [None] * cache.slots  # the KV policy that compacted a free slot
        self.busy: dict[int, Holder] = {}
        self.released = [0] * cache.slots  # when each slot was last freed (LRU among free slots)
        self.clock = 0
        self.saved: OrderedDict[int, _Saved] = OrderedDict()  # host LRU, oldest first
        self.saved_bytes = 0
        self._keys = 0
        self.queries = self.hits = 0  # prompt tokens looked up, and found (vLLM's prefix-cache counters)

    @property
    def free_slots(self) -> int:
        return self.cache.slots - len(self.busy)

    def holding(self, slot: int) -> list[int]:
        if slot in self.busy:
            owner = self.busy[slot]
            return [] if self.cache.compacted[slot] else owner.tokens[:owner.computed]
        return self.contents[slot]

    def assign(self, prompt: list[int], owner: Holder) -> tuple[int, int]:
        """A free slot for `owner`, holding the longest cached prefix of `prompt`: (slot, cached tokens)."""
        free = [s for s in range(self.cache.slots) if s not in self.busy]
        if not free:
            raise RuntimeError("no free slot")
        limit = len(prompt) - 1 if self.enabled else 0

        def match(tokens: list[int]) -> int:
            return min(limit, common_prefix(tokens, prompt)) if limit > 0 else 0

        policy = owner.kv.policy if getattr(owner, "kv", None) is not None else None

        def continues(s: int) -> int:  # a compacted slot: all of it, under the same policy, or nothing
            held = self.contents[s]
            ok = policy == self.policies[s] and 0 < len(held) <= limit and common_prefix(held, prompt) == len(held)
            return len(held) if ok else 0

        here = {s: continues(s) if self.cache.compacted[s] else match(self.contents[s]) for s in free}
        slot = max(free, key=lambda s: (here[s], -self.released[s]))  # continue a slot in place
        source, found = None, here[slot]
        for s in self.busy:  # or copy from a running sequence, or from host memory, if that gives more
            if (n := match(self.holding(s))) > found:
                source, found = s, n
        for key, entry in self.saved.items():
            if (n := match(entry.tokens)) > found:
                source, found = ("saved", key), n
        entry = None
        if isinstance(source, tuple):
            entry = self.saved[source[1]]  # held here: saving the slot below may push it out of the LRU
            self.saved.move_to_end(source[1])
        if source is not None:
            slot = min(free, key=lambda s: (len(self.contents[s]) > 0, self.released[s]))  # least recently freed
        if self.cache.compacted[slot] and (source is not None or found == 0):
            self.cache.reset(slot)  # compacted entries nobody continues
            self.contents[slot] = []
        if len(self.contents[slot]) - (0 if source is not None else found) >= self.min_tokens \
                and not self.cache.compacted[slot]:
            self.save(self.contents[slot], slot)  # what is about to be overwritten goes to host memory
        if entry is not None:
            self.cache.load(slot, entry.k.to(self.cache.k.device), entry.v.to(self.cache.k.device), found)
        elif source is not None:
            self.cache.copy(source, slot, found)
        else:
            self.cache.rollback(slot, min(self.cache.tokens(slot), found))
        self.contents[slot] = []
        self.busy[slot] = owner
        self.queries += len(prompt)
        self.hits += found
        return slot, found

    def share(self, src: int, dst: int, start: int, end: int) -> None:
        """A running sequence in `dst` (holding `start` tokens) takes positions start..end from `src`."""
        self.cache.copy(src, dst, end, start=start)
        self.hits += end - start

    def release(self, slot: int, tokens: list[int]) -> None:
        """The slot's sequence ended; its entries for `tokens` (what the slot really holds) stay for
        later prompts that continue them."""
        owner = self.busy.pop(slot, None)
        self.policies[slot] = None
        if self.cache.compacted[slot]:  # a KV policy dropped entries: only its own next turn continues them
            if self.enabled and owner is not None and getattr(owner, "kv", None) is not None:
                self.policies[slot] = owner.kv.policy
            else:
                self.cache.reset(slot)
                tokens = []
        self.cache.rollback(slot, len(tokens))
        self.contents[slot] = list(tokens) if self.enabled else []
        self.clock += 1
        self.released[slot] = self.clock

    def save(self, tokens: list[int], slot: int) -> None:
        """Copy the entries of `tokens` (held by `slot`) into the host LRU, within the byte budget."""
        n = len(tokens)
        if not self.enabled or n * self.cache.bytes_per_token > self.budget:
            return
        for key, entry in list(self.saved.items()):
            if common_prefix(entry.tokens, tokens) == n:  # already saved, as part of a longer entry
                self.saved.move_to_end(key)
                return
            if common_prefix(entry.tokens, tokens) == len(entry.tokens):  # the new entry covers this one
                self._drop(key)
        k, v = self.cache.save(slot, n)
        self._keys += 1
        self.saved[self._keys] = _Saved(list(tokens), k, v)
        self.saved_bytes += self.saved[self._keys].nbytes
        while self.saved_bytes > self.budget:
            self._drop(next(iter(self.saved)))

    def _drop(self, key: int) -> None:
        self.saved_bytes -= self.saved.pop(key).nbytes
