"""The prefix cache: a new sequence starts from the longest prefix of its prompt whose keys and
values are already computed somewhere.

Three places can hold such a prefix (llama.cpp's per-slot longest common prefix, plus a host LRU):
- a free slot: a finished sequence's entries stay in its slot; a new sequence whose prompt
  continues it (the next turn of a chat) takes that slot and reads only what is new;
- a busy slot: a running sequence that shares a prefix (a system prompt, the same document) has
  its entries copied into the new sequence's slot;
- the host LRU: before a free slot's entries are overwritten they are copied to host memory,
  least recently used first out, within a byte budget; a hit is copied back into the slot.

A model with sliding-window layers holds only their recent positions (`KVCache.front`): a prefix
is then found only where the window before its end is still held (`KVCache.resumable`), which the
next turn of a chat always is, and a shared system prompt is while its sequence is young.

A slot whose sequence had entries dropped by a KV policy (`kv_policy.py`) holds no exact prefix,
so it is never copied; only the next turn of the same conversation under the same policy may
continue it in place (its prompt extends everything the slot went through), which is how a
compressed cache serves a follow-up (SCBench's multi-turn mode). Anything else resets it.

The index only decides (`lookup` at admission, `release` at the end); the model runner
(`runner.py`) copies, loads and saves the entries.

Reuse is exact: attention is row-exact (`attention.py`), so a position's entries depend only on
the tokens up to it, never on how they were computed. The prompt's last token is always read
again, since its logits give the first new token. A slot's content is a list of tokens whose
entries it holds; a busy slot's is read from its sequence (tokens[:computed]) when asked, so it
is never stale after a rollback.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .kv_cache import Entries, KVCache
from .slots import Holder, Slots


@dataclass
class Saved:
    tokens: list[int]
    entries: Entries

    @property
    def nbytes(self) -> int:
        return self.entries.nbytes


@dataclass
class Hit:
    """Where a new sequence's cached prefix comes from (`PrefixCache.lookup` decides, the model
    runner carries it out): the slot it gets and how many prompt tokens it will hold there, copied
    from a busy slot (`source`) or loaded from host memory (`saved`), or already in place; the
    slot's compacted entries are dropped first (`reset`), or its tokens saved to host memory
    before they are overwritten (`evict`)."""

    slot: int
    found: int
    source: int | None = None
    saved: Saved | None = None
    reset: bool = False
    evict: list[int] | None = None


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
    """The prefix index: what each free slot and the host LRU hold, and where a new prompt's
    longest cached prefix is. It decides (`lookup`, `release`); the model runner moves the entries."""

    def __init__(
        self, cache: KVCache, slots: Slots, budget_bytes: int = 1 << 30, enabled: bool = True, min_tokens: int = 16
    ):
        self.cache, self.slots = cache, slots  # the cache is only read here (lengths, compacted, sizes)
        self.budget, self.enabled, self.min_tokens = budget_bytes, enabled, min_tokens
        self.contents: list[list[int]] = [[] for _ in range(cache.slots)]  # what each free slot holds
        self.policies: list[object | None] = [None] * cache.slots  # the KV policy that compacted a free slot
        self.saved: OrderedDict[int, Saved] = OrderedDict()  # host LRU, oldest first
        self.saved_bytes = 0
        self._keys = 0
        self.queries = self.hits = 0  # prompt tokens looked up, and found (vLLM's prefix-cache counters)

    def holding(self, slot: int) -> list[int]:
        owner = self.slots.owners.get(slot)
        if owner is not None:
            return [] if self.cache.compacted[slot] else owner.tokens[: owner.computed]
        return self.contents[slot]

    def lookup(self, prompt: list[int], owner: Holder) -> Hit:
        """Take a free slot for `owner`, choosing where the longest cached prefix of `prompt` comes from."""
        free = self.slots.free
        if not free:
            raise RuntimeError("no free slot")
        limit = len(prompt) - 1 if self.enabled else 0
        released = self.slots.released

        def match(tokens: list[int], front: int = 0) -> int:
            n = min(limit, common_prefix(tokens, prompt)) if limit > 0 else 0
            return n if self.cache.resumable(front, n) else 0  # (sliding layers: the window before n is held)

        policy = owner.kv.policy if getattr(owner, "kv", None) is not None else None

        def continues(s: int) -> int:  # a compacted slot: all of it, under the same policy, or nothing
            held = self.contents[s]
            ok = policy == self.policies[s] and 0 < len(held) <= limit and common_prefix(held, prompt) == len(held)
            return len(held) if ok else 0

        front = self.cache.front
        here = {s: continues(s) if self.cache.compacted[s] else match(self.contents[s], front[s]) for s in free}
        slot = max(free, key=lambda s: (here[s], -released[s]))  # continue a slot in place
        source, found = None, here[slot]
        for s in self.slots.owners:  # or copy from a running sequence, or from host memory, if that gives more
            if (n := match(self.holding(s), front[s])) > found:
                source, found = s, n
        for key, entry in self.saved.items():
            if (n := match(entry.tokens, entry.entries.front)) > found:
                source, found = ("saved", key), n
        hit = Hit(slot, found)
        if isinstance(source, tuple):
            hit.saved = self.saved[source[1]]  # held here: saving the slot's entries may push it out of the LRU
            self.saved.move_to_end(source[1])
        elif source is not None:
            hit.source = source
        if source is not None:
            hit.slot = slot = min(free, key=lambda s: (len(self.contents[s]) > 0, released[s]))  # least recently freed
        if self.cache.compacted[slot]:
            hit.reset = source is not None or found == 0  # compacted entries nobody continues
        elif (
            len(self.contents[slot]) - (0 if source is not None else found) >= self.min_tokens
            and self.cache.resumable(front[slot], len(self.contents[slot]))
            and self._worth_saving(self.contents[slot], front[slot])
        ):
            hit.evict = self.contents[slot]  # what is about to be overwritten goes to host memory
        self.contents[slot] = []
        self.slots.take(slot, owner)
        self.queries += len(prompt)
        self.hits += found
        return hit

    def shared(self, tokens: int) -> None:
        """A running sequence took `tokens` entries from another one's slot (`Scheduler._share`)."""
        self.hits += tokens

    def release(self, slot: int, tokens: list[int]) -> list[int] | None:
        """The slot's sequence ended holding entries for `tokens`: what the slot keeps for later prompts
        that continue them (None: nothing, empty it)."""
        owner = self.slots.release(slot)
        self.policies[slot] = None
        if self.cache.compacted[slot]:  # a KV policy dropped entries: only its own next turn continues them
            if self.enabled and owner is not None and getattr(owner, "kv", None) is not None:
                self.policies[slot] = owner.kv.policy
            else:
                self.contents[slot] = []
                return None
        self.contents[slot] = list(tokens) if self.enabled else []
        return tokens

    def _worth_saving(self, tokens: list[int], front: int = 0) -> bool:
        """Whether the host LRU should take `tokens`' entries, whose sliding layers start at token
        `front` (within the budget, not already held: a longer entry holds them if it can go on from
        where they end, `KVCache.resumable`)."""
        n = len(tokens)
        if not self.enabled or self.cache.saved_bytes(front, n) > self.budget:
            return False
        for key, entry in self.saved.items():
            if common_prefix(entry.tokens, tokens) == n and self.cache.resumable(entry.entries.front, n):
                self.saved.move_to_end(key)
                return False
        return True

    def remember(self, tokens: list[int], entries: Entries) -> None:
        """Put saved entries of `tokens` into the host LRU, dropping entries they cover and the oldest
        beyond the byte budget."""
        for key, entry in list(self.saved.items()):
            n = len(entry.tokens)
            if common_prefix(entry.tokens, tokens) == n and self.cache.resumable(entries.front, n):
                self._drop(key)  # the new entry covers this one
        self._keys += 1
        self.saved[self._keys] = Saved(list(tokens), entries)
        self.saved_bytes += self.saved[self._keys].nbytes
        while self.saved_bytes > self.budget:
            self._drop(next(iter(self.saved)))

    def _drop(self, key: int) -> None:
        self.saved_bytes -= self.saved.pop(key).nbytes
