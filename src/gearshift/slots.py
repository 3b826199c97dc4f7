"""Which KV cache slots are taken, and by whom: the cache's allocator.

One slot holds one sequence (vLLM's block manager with a single block per sequence). The
scheduler takes a slot for a sequence it admits and gives it back when the sequence ends; the
prefix index (`prefix_cache.py`) reads who holds a busy slot and which free slot was freed longest
ago. The storage itself (`kv_cache.py`) knows nothing of owners.
"""

from __future__ import annotations

from typing import Protocol


class Holder(Protocol):
    """What a busy slot's owner exposes: its tokens, the first `computed` of them cached, and its
    KV policy state (None: a full cache)."""

    tokens: list[int]
    computed: int
    kv: object | None


class Slots:
    def __init__(self, n: int):
        self.n = n
        self.owners: dict[int, Holder] = {}
        self.released = [0] * n  # when each slot was last freed (a clock tick): LRU among free slots
        self.clock = 0

    @property
    def free(self) -> list[int]:
        return [s for s in range(self.n) if s not in self.owners]

    @property
    def free_count(self) -> int:
        return self.n - len(self.owners)

    def take(self, slot: int, owner: Holder) -> None:
        if slot in self.owners:
            raise RuntimeError(f"slot {slot} is taken")
        self.owners[slot] = owner

    def release(self, slot: int) -> Holder | None:
        owner = self.owners.pop(slot, None)
        self.clock += 1
        self.released[slot] = self.clock
        return owner
