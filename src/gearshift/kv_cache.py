"""The one KV cache every model uses: a fixed number of slots, one sequence each, with its own length.

Layout [layers, slots, positions, kv heads, head dim]: a slot's entries for one layer are one
contiguous run, every row of a step is written with one `index_copy_` per layer, and attention
reads a slot's first n positions as a view. Buffers are allocated with `torch.empty`, so a slot
costs memory only for the positions that have been written (the operating system maps untouched
pages lazily on a CPU).

Speculative decoding writes entries for draft tokens and then keeps only the accepted ones:
rolling back is moving a slot's length back, keeping one path of a token tree is one gather.
A finished sequence's entries stay in its slot: the prefix cache (`prefix_cache.py`) reuses them.

A KV policy (`kv_policy.py`) can drop entries: `compact` keeps, per layer and KV head, the entries
it names, moved to the front of the slot in their order; the slot's length becomes the largest
count kept, and a head that kept fewer has a *hole* up to it (`holes[layer, slot, head] = [a, b)`,
positions attention skips). Keys keep the rotation (RoPE) of the position they were computed at,
so nothing is recomputed; `shift[slot]` is how many positions the slot has dropped in all, which
is what turns a slot position into a token position. The engine speaks in token positions
(`rollback`, `keep`), the layout in slot positions (`lengths`).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, slots, max_len, n_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = [0] * slots  # positions of each slot that hold valid entries
        self.shift = [0] * slots  # positions dropped by a KV policy: token position = slot position + shift
        self.holes = torch.zeros(n_layers, slots, n_kv_heads, 2, dtype=torch.int64, device=device)
        self.compacted = [False] * slots  # whether a policy dropped entries of the slot's sequence
        # views made once: per layer, every slot's rows for writes, and each slot as [1, kv heads, positions, D]
        # (4-D: the shape scaled_dot_product_attention's fused CPU kernel takes; 3-D falls back to a slow path)
        self.rows = [(self.k[i].view(-1, n_kv_heads, head_dim), self.v[i].view(-1, n_kv_heads, head_dim))
                     for i in range(n_layers)]
        self.heads = [[(self.k[i, s].transpose(0, 1)[None], self.v[i, s].transpose(0, 1)[None]) for s in range(slots)]
                      for i in range(n_layers)]

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def entry_bytes(self) -> int:
        """Key and value of one position in one layer and KV head."""
        return 2 * self.k.shape[-1] * self.k.element_size()

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one position, every layer."""
        return 2 * self.k[:, 0, 0].numel() * self.k.element_size()

    def tokens(self, slot: int) -> int:
        """Tokens the slot's sequence has been through (its held entries plus those dropped)."""
        return self.lengths[slot] + self.shift[slot]

    def rollback(self, slot: int, position: int) -> None:
        """Forget everything of `slot` from token `position` on (e.g. rejected draft tokens)."""
        at = position - self.shift[slot]
        if not 0 <= at <= self.lengths[slot] or (self.compacted[slot] and at < self.holes[:, slot, :, 1].max()):
            raise ValueError(f"cannot roll back to {position}: slot {slot} holds {self.lengths[slot]} positions"
                             + (f" after dropping {self.shift[slot]}" if self.shift[slot] else ""))
        self.lengths[slot] = at

    def reset(self, slot: int) -> None:
        """Empty the slot, dropped entries and holes forgotten."""
        self.lengths[slot] = self.shift[slot] = 0
        self.holes[:, slot] = 0
        self.compacted[slot] = False

    def compact(self, slot: int, keep: list[list[torch.Tensor]]) -> None:
        """Keep, for each layer and KV head, the entries at slot positions `keep[layer][head]`
        (ascending), moved to the front; every other entry is dropped. See the module docstring."""
        n = self.lengths[slot]
        end = max(len(idx) for per_layer in keep for idx in per_layer)
        for layer, per_layer in enumerate(keep):
            for head, idx in enumerate(per_layer):
                m = len(idx)
                idx = idx.to(self.k.device)
                self.k[layer, slot, :m, head] = self.k[layer, slot, idx, head]
                self.v[layer, slot, :m, head] = self.v[layer, slot, idx, head]
                self.holes[layer, slot, head, 0] = m
                self.holes[layer, slot, head, 1] = end
        self.shift[slot] += n - end
        self.lengths[slot] = end
        self.compacted[slot] = True

    def held(self, slot: int) -> int:
        """Entries the slot holds, over every layer and KV head (holes excluded)."""
        h = self.holes[:, slot]
        return int(self.lengths[slot] * h.shape[0] * h.shape[1] - (h[..., 1].clamp(max=self.lengths[slot])
                                                                    - h[..., 0]).clamp(min=0).sum())

    def keep(self, slot: int, start: int, nodes: list[int]) -> None:
        """After scoring a token tree whose root sits at token position `start`: move the accepted
        path's entries (node indices, root first) into place and forget the rest."""
        start -= self.shift[slot]
        if nodes != list(range(len(nodes))):
            src = torch.tensor(nodes, device=self.k.device) + start
            end = start + len(nodes)
            self.k[:, slot, start:end] = self.k[:, slot, src]
            self.v[:, slot, start:end] = self.v[:, slot, src]
        self.lengths[slot] = start + len(nodes)

    def copy(self, src: int, dst: int, n: int, start: int = 0) -> None:
        """Give slot `dst` positions start..n of slot `src` (a prefix shared by two sequences;
        `dst` already holds the positions before `start`)."""
        self.k[:, dst, start:n] = self.k[:, src, start:n]
        self.v[:, dst, start:n] = self.v[:, src, start:n]
        self.lengths[dst] = n

    def save(self, slot: int, n: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the first n positions of `slot`, in host memory by default."""
        return self.k[:, slot, :n].to(device, copy=True), self.v[:, slot, :n].to(device, copy=True)

    def load(self, slot: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Put the first n positions of a saved copy back into `slot`."""
        self.k[:, slot, :n] = k[:, :n]
        self.v[:, slot, :n] = v[:, :n]
        self.lengths[slot] = n

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
