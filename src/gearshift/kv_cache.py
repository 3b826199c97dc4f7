"""The one KV cache every model uses: preallocated, left-padded for batches, rolled back in O(1).

Speculative decoding writes keys/values for draft tokens and then keeps only the accepted ones;
because the buffers are static, rolling back is just moving `length` back, and keeping one path
of a token tree is one gather per buffer.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        # per row: how many left-padding slots precede the row's first real token
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def reset(self, pad: torch.Tensor | None = None) -> None:
        self.length = 0
        self.pad = torch.zeros_like(self.pad) if pad is None else pad.to(self.pad.device)

    def rollback(self, position: int) -> None:
        """Forget everything from `position` on (e.g. rejected draft tokens)."""
        if not 0 <= position <= self.length:
            raise ValueError(f"cannot roll back to {position}: cache holds {self.length} positions")
        self.length = position

    def keep(self, start: int, nodes: list[int]) -> None:
        """After scoring a token tree at `start`: move the accepted path's entries (node indices,
        root first) into place and forget the rest."""
        if nodes != list(range(len(nodes))):
            src = torch.tensor(nodes, device=self.k.device) + start
            end = start + len(nodes)
            self.k[:, :, :, start:end] = self.k[:, :, :, src]
            self.v[:, :, :, start:end] = self.v[:, :, :, src]
        self.rollback(start + len(nodes))

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
