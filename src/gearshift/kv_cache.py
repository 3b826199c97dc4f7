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

A slot can also be *quantized* (`set_format`): every entry written to it gets a second, quantized
copy (`int8`: one signed byte per channel and a scale per entry and KV head; `int4`: two channels
per byte, a scale and minimum per half of the head, as KIVI's per-token groups), and attention reads
a row's keys from that copy except its `recent` last ones (KIVI's full-precision window). The float32
entries stay: they are the recent window, what the prefix cache shares (exactly, with any request),
and what a compaction gathers; what shrinks is what each step reads (`held_bytes`).
"""

from __future__ import annotations

import torch

from . import kernels

FORMATS = {"int8": 1, "int4": 2}  # quantized copies (see the module docstring); 0: float32 only


def quantize(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (codes [..., D] uint8, scales [..., 4] float32). int8: symmetric, one
    scale per vector (error <= scale / 2 = max|x| / 254). int4: byte i holds channel i (low nibble)
    and channel i + D/2 (high); per half a scale and a minimum (error <= (max - min) / 30)."""
    x = x.float()
    codes = torch.zeros(*x.shape, dtype=torch.uint8, device=x.device)
    scales = torch.zeros(*x.shape[:-1], 4, dtype=torch.float32, device=x.device)
    if fmt == "int8":
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        codes.copy_(torch.round(x / s).clamp(-127, 127).to(torch.int8).view(torch.uint8))
        scales[..., :1] = s
        return codes, scales
    half = x.shape[-1] // 2
    parts = []
    for i, h in enumerate((x[..., :half], x[..., half:])):
        lo, hi = h.amin(-1, keepdim=True), h.amax(-1, keepdim=True)
        s = ((hi - lo) / 15).clamp(min=1e-12)
        parts.append(torch.round((h - lo) / s).clamp(0, 15).to(torch.uint8))
        scales[..., 2 * i : 2 * i + 1], scales[..., 2 * i + 1 : 2 * i + 2] = s, lo
    codes[..., :half] = parts[0] | (parts[1] << 4)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """The inverse of `quantize` (up to its error): float32 [..., D]."""
    if fmt == "int8":
        return codes.view(torch.int8).float() * scales[..., :1]
    half = codes.shape[-1] // 2
    b = codes[..., :half]
    return torch.cat(
        [
            (b & 15).float() * scales[..., 0:1] + scales[..., 1:2],
            (b >> 4).float() * scales[..., 2:3] + scales[..., 3:4],
        ],
        dim=-1,
    )


class KVCache:
    def __init__(
        self,
        n_layers: int,
        slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
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
        self.rows = [
            (self.k[i].view(-1, n_kv_heads, head_dim), self.v[i].view(-1, n_kv_heads, head_dim))
            for i in range(n_layers)
        ]
        self.heads = [
            [(self.k[i, s].transpose(0, 1)[None], self.v[i, s].transpose(0, 1)[None]) for s in range(slots)]
            for i in range(n_layers)
        ]
        self.rope_at_slot = [False] * slots  # keys re-rotated to their slot positions (StreamingLLM)
        self.inv_freq: torch.Tensor | None = None  # RoPE's frequencies (set by the model), for re-rotating
        self.windows: list[int | None] = [None] * n_layers  # per layer, its attention window (set by the model)
        self.formats: list[str | None] = [None] * slots  # a slot's quantized copy, if any
        self.qfmt = torch.zeros(slots, 2, dtype=torch.int64)  # per slot: FORMATS code, recent window (the kernel's)
        self.kq = self.vq = self.ks = self.vs = None  # the quantized copies, allocated on first use

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
            raise ValueError(
                f"cannot roll back to {position}: slot {slot} holds {self.lengths[slot]} positions"
                + (f" after dropping {self.shift[slot]}" if self.shift[slot] else "")
            )
        self.lengths[slot] = at

    def reset(self, slot: int) -> None:
        """Empty the slot, dropped entries and holes forgotten."""
        self.lengths[slot] = self.shift[slot] = 0
        self.holes[:, slot] = 0
        self.compacted[slot] = self.rope_at_slot[slot] = False
        self.set_format(slot, None)

    def set_format(self, slot: int, fmt: str | None, recent: int = 0) -> None:
        """Read the slot quantized from now on (`fmt` int8 / int4; None: float32 only), all but each
        row's `recent` last keys; the entries it already holds are quantized now."""
        self.formats[slot] = fmt
        self.qfmt[slot, 0], self.qfmt[slot, 1] = (FORMATS[fmt], recent) if fmt else (0, 0)
        if fmt:
            if self.kq is None:
                shape = self.k.shape
                self.kq = torch.empty(shape, dtype=torch.uint8, device=self.k.device)
                self.vq = torch.empty(shape, dtype=torch.uint8, device=self.k.device)
                self.ks = torch.empty(*shape[:-1], 4, dtype=torch.float32, device=self.k.device)
                self.vs = torch.empty(*shape[:-1], 4, dtype=torch.float32, device=self.k.device)
            self._requantize(slot, 0, self.lengths[slot])

    def _requantize(self, slot: int, start: int, end: int) -> None:
        """Quantize the slot's float32 entries at positions start..end-1 (every layer) into its copy
        (with the native op where the native attention reads it: the same bytes as written rows get)."""
        fmt = self.formats[slot]
        if not fmt or end <= start:
            return
        if kernels.paths(self.k.device.type, self.k.dtype).attention:
            write = slot * self.max_len + torch.arange(start, end)
            for layer in range(self.k.shape[0]):
                torch.ops.gearshift.quantize_into(
                    self.k[layer, slot, start:end], self.v[layer, slot, start:end], write, *self.quantized_layer(layer)
                )
            return
        for src, codes, scales in ((self.k, self.kq, self.ks), (self.v, self.vq, self.vs)):
            codes[:, slot, start:end], scales[:, slot, start:end] = quantize(src[:, slot, start:end], fmt)

    def quantized_layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        """One layer's quantized copies and the slots' formats, as the native ops take them."""
        return self.kq[layer], self.vq[layer], self.ks[layer], self.vs[layer], self.qfmt

    def write_quantized(self, layer: int, fmt: str, write: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The quantized copies of rows k, v [rows, KVH, D] just written at flat positions `write`."""
        kvh, d = self.k.shape[3], self.k.shape[4]
        for x, codes, scales in ((k, self.kq, self.ks), (v, self.vq, self.vs)):
            c, s = quantize(x, fmt)
            codes[layer].view(-1, kvh, d).index_copy_(0, write, c)
            scales[layer].view(-1, kvh, 4).index_copy_(0, write, s)

    def read(
        self, layer: int, slot: int, n: int, live: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [1, KVH, n, D] as a row attending positions 0..n-1 of the slot sees them:
        for a quantized slot, dequantized but for each head's `recent` last live entries (PyTorch
        attention's path; the native kernel does the same per row)."""
        keys, values = self.heads[layer][slot]
        fmt = self.formats[slot]
        if not fmt:
            return keys[:, :, :n], values[:, :, :n]
        recent = int(self.qfmt[slot, 1])
        counted = (
            live[0, :, 0, :n]
            if live is not None
            else torch.ones(keys.shape[1], n, dtype=torch.bool, device=keys.device)
        ).long()
        after = counted.flip(-1).cumsum(-1).flip(-1)  # live entries at or after each position
        exact = (after <= recent)[..., None]  # [KVH, n, 1]
        out = []
        for x, codes, scales in ((keys, self.kq, self.ks), (values, self.vq, self.vs)):
            deq = dequantize(codes[layer, slot, :n], scales[layer, slot, :n], fmt).transpose(0, 1)
            out.append(torch.where(exact, x[0, :, :n].float(), deq).to(x.dtype)[None])
        return out[0], out[1]

    def held_bytes(self, slot: int) -> int:
        """Bytes of the entries the slot holds, as attention reads them (quantized ones at their size)."""
        fmt = self.formats[slot]
        if not fmt:
            return self.held(slot) * self.entry_bytes
        h, n, d = self.holes[:, slot], self.lengths[slot], self.k.shape[-1]
        live = n - (h[..., 1].clamp(max=n) - h[..., 0]).clamp(min=0)  # [layers, KVH]
        exact = live.clamp(max=int(self.qfmt[slot, 1]))
        q_entry = 2 * ((d if fmt == "int8" else d // 2) + (4 if fmt == "int8" else 16))
        return int(exact.sum()) * self.entry_bytes + int((live - exact).sum()) * q_entry

    def compact(self, slot: int, keep: list[list[torch.Tensor]], rerotate: bool = False) -> None:
        """Keep, for each layer and KV head, the entries at slot positions `keep[layer][head]`
        (ascending), moved to the front; every other entry is dropped. See the module docstring.

        `rerotate` (StreamingLLM): turn each kept key's rotation into that of its new slot position,
        and from now on give new tokens their slot positions too, so positions never run past what
        the model was trained on however long the sequence goes. (RoPE rotations compose: rotating
        by the difference of positions is rotating at the new one, up to float rounding.)"""
        n = self.lengths[slot]
        end = max(len(idx) for per_layer in keep for idx in per_layer)
        was = 0 if self.rope_at_slot[slot] else self.shift[slot]  # a slot position's RoPE position, before
        for layer, per_layer in enumerate(keep):
            for head, idx in enumerate(per_layer):
                m = len(idx)
                idx = idx.to(self.k.device)
                place = torch.arange(m, device=idx.device)
                moved = not bool((idx == place).all())
                if moved:  # (else already in place)
                    for x in self._stores(slot):
                        x[layer, slot, :m, head] = x[layer, slot, idx, head]
                if rerotate and (moved or was):
                    self._rotate(layer, slot, head, m, (place - idx - was).float())
                self.holes[layer, slot, head, 0] = m
                self.holes[layer, slot, head, 1] = end
        self.shift[slot] += n - end
        self.lengths[slot] = end
        self.compacted[slot] = True
        if rerotate:
            self.rope_at_slot[slot] = True
            self._requantize(slot, 0, end)

    def _rotate(self, layer: int, slot: int, head: int, m: int, delta: torch.Tensor) -> None:
        """Rotate the first m keys of one head by `delta` positions each (interleaved RoPE pairs)."""
        if self.inv_freq is None:
            raise ValueError("re-rotating keys needs the model's RoPE frequencies (KVCache.inv_freq)")
        keys = self.k[layer, slot, :m, head]
        rot = torch.polar(torch.ones(m, len(self.inv_freq), device=keys.device), delta[:, None] * self.inv_freq)
        pairs = torch.view_as_complex(keys.float().reshape(m, -1, 2).contiguous())
        keys.copy_(torch.view_as_real(pairs * rot).flatten(-2))

    def held(self, slot: int) -> int:
        """Entries the slot holds, over every layer and KV head (holes excluded)."""
        h = self.holes[:, slot]
        return int(
            self.lengths[slot] * h.shape[0] * h.shape[1]
            - (h[..., 1].clamp(max=self.lengths[slot]) - h[..., 0]).clamp(min=0).sum()
        )

    def keep(self, slot: int, start: int, nodes: list[int]) -> None:
        """After scoring a token tree whose root sits at token position `start`: move the accepted
        path's entries (node indices, root first) into place and forget the rest."""
        start -= self.shift[slot]
        if nodes != list(range(len(nodes))):
            src = torch.tensor(nodes, device=self.k.device) + start
            end = start + len(nodes)
            for x in self._stores(slot):
                x[:, slot, start:end] = x[:, slot, src]
        self.lengths[slot] = start + len(nodes)

    def copy(self, src: int, dst: int, n: int, start: int = 0) -> None:
        """Give slot `dst` positions start..n of slot `src` (a prefix shared by two sequences;
        `dst` already holds the positions before `start`)."""
        self.k[:, dst, start:n] = self.k[:, src, start:n]
        self.v[:, dst, start:n] = self.v[:, src, start:n]
        self.lengths[dst] = n
        self._requantize(dst, start, n)

    def save(self, slot: int, n: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the first n positions of `slot`, in host memory by default."""
        return self.k[:, slot, :n].to(device, copy=True), self.v[:, slot, :n].to(device, copy=True)

    def load(self, slot: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Put the first n positions of a saved copy back into `slot`."""
        self.k[:, slot, :n] = k[:, :n]
        self.v[:, slot, :n] = v[:, :n]
        self.lengths[slot] = n
        self._requantize(slot, 0, n)

    def _stores(self, slot: int) -> list[torch.Tensor]:
        """The tensors that hold the slot's entries: float32, and its quantized copies if it has them."""
        return [self.k, self.v] + ([self.kq, self.vq, self.ks, self.vs] if self.formats[slot] else [])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
