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

A sliding-window layer (Gemma 3: five of every six) keeps only the positions a row can still see:
its entries for token positions `front[slot]`.. sit from slot position 0 on, and once `MOVE_EVERY`
positions more than it needs have piled up (`slide`, before a step), the ones it needs (its window
and `ROLLBACK` more, for a rejected draft) move to the front. Pages past that are never written, so
on a CPU such a layer costs a few thousand positions of memory however long the sequence runs
(the global layers, as ever, every position). Every place that turns a token position into a slot
position subtracts `offset(layer, slot)`; nothing else changes, and nothing is recomputed. KV
policies and quantized copies are refused for such models (`EngineCore.check`), so a slot has
either a front or holes, never both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels

FORMATS = {"int8": 1, "int4": 2}  # quantized copies (see the module docstring); 0: float32 only
ROLLBACK = 128  # positions a sliding layer keeps before its window: a rollback that far (a rejected draft) still works
MOVE_EVERY = 128  # a sliding layer's entries move to the front once so many positions can be dropped


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


@dataclass
class Entries:
    """A copy of a slot's entries for its first n token positions (`KVCache.save`): the global
    layers' [layers, n, KVH, D], the sliding layers' from token position `front` on."""

    k: torch.Tensor
    v: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    front: int = 0

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (self.k, self.v, self.wk, self.wv))

    def to(self, device: str | torch.device) -> Entries:
        return Entries(*(x.to(device) for x in (self.k, self.v, self.wk, self.wv)), front=self.front)


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
        self.front = [0] * slots  # token position of the first entry the sliding layers hold (slot position 0)
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

    @property
    def sliding(self) -> list[int]:
        """The layers with an attention window."""
        return [i for i, w in enumerate(self.windows) if w]

    @property
    def global_layers(self) -> list[int]:
        """The layers without one: they hold every position."""
        return [i for i, w in enumerate(self.windows) if not w]

    @property
    def window(self) -> int:
        """The longest attention window (0: none)."""
        return max(w or 0 for w in self.windows)

    @property
    def keep_back(self) -> int:
        """Positions before the next row the sliding layers keep when they slide: the longest
        window's, less the row itself, and `ROLLBACK` more."""
        return self.window - 1 + ROLLBACK

    def offset(self, layer: int, slot: int) -> int:
        """What to subtract from a token position for the layer's slot position in `slot`."""
        return self.front[slot] if self.windows[layer] else 0

    def saved_bytes(self, front: int, n: int) -> int:
        """Bytes of `save`'s copy of n token positions whose sliding layers start at `front`."""
        per_layer = self.entry_bytes * self.k.shape[3]
        return (len(self.global_layers) * n + len(self.sliding) * max(n - front, 0)) * per_layer

    def resumable(self, front: int, n: int) -> bool:
        """Whether entries whose sliding layers start at token position `front` can go on from
        position n: the next row there sees the window before it (at position 0, nothing)."""
        return front == 0 or n == 0 or n - front >= self.window - 1

    def slide(self, slot: int) -> None:
        """Before a step: once the sliding layers hold `MOVE_EVERY` positions more than `keep_back`,
        the last `keep_back` move to the front of the slot and the rest are forgotten."""
        sliding = self.sliding
        if not sliding:
            return
        keep = self.keep_back
        drop = self.lengths[slot] - self.front[slot] - keep
        if drop < MOVE_EVERY:
            return
        layers = torch.tensor(sliding, device=self.k.device)
        for x in (self.k, self.v):
            x[layers, slot, :keep] = x[layers, slot, drop : drop + keep]  # (the right side is a copy)
        self.front[slot] += drop

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
        if not self.resumable(self.front[slot], at):
            raise ValueError(
                f"cannot roll back to {position}: the sliding layers of slot {slot} hold positions "
                f"{self.front[slot]} on only"
            )
        self.lengths[slot] = at
        if at == 0:
            self.front[slot] = 0

    def reset(self, slot: int) -> None:
        """Empty the slot, dropped entries and holes forgotten."""
        self.lengths[slot] = self.shift[slot] = self.front[slot] = 0
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
            - self.front[slot] * len(self.sliding) * h.shape[1]
        )

    def keep(self, slot: int, start: int, nodes: list[int]) -> None:
        """After scoring a token tree whose root sits at token position `start`: move the accepted
        path's entries (node indices, root first) into place and forget the rest."""
        start -= self.shift[slot]
        if nodes != list(range(len(nodes))):
            src = torch.tensor(nodes, device=self.k.device) + start
            end = start + len(nodes)
            if not self.front[slot]:
                for x in self._stores(slot):
                    x[:, slot, start:end] = x[:, slot, src]
            else:  # the sliding layers' slot positions are `front` lower
                place = torch.arange(start, end, device=self.k.device)
                for layers, off in self._groups(slot):
                    for x in (self.k[:, slot], self.v[:, slot]):
                        x[layers[:, None], place - off] = x[layers[:, None], src - off]
        self.lengths[slot] = start + len(nodes)

    def _groups(self, slot: int) -> list[tuple[torch.Tensor, int]]:
        """The global layers and the sliding ones (as index tensors), each with its offset in `slot`."""
        dev = self.k.device
        return [
            (torch.tensor(self.global_layers, dtype=torch.long, device=dev), 0),
            (torch.tensor(self.sliding, dtype=torch.long, device=dev), self.front[slot]),
        ]

    def copy(self, src: int, dst: int, n: int, start: int = 0) -> None:
        """Give slot `dst` positions start..n of slot `src` (a prefix shared by two sequences;
        `dst` already holds the positions before `start`). The sliding layers get the part of the
        window before n that `src` holds, at the front of `dst`."""
        if not self.resumable(self.front[src], n):
            raise ValueError(f"slot {src}'s sliding layers no longer hold the window before position {n}")
        lo = max(self.front[src], n - self.keep_back, 0) if self.sliding else 0
        if lo == 0 and self.front[dst] == 0:
            self.k[:, dst, start:n] = self.k[:, src, start:n]
            self.v[:, dst, start:n] = self.v[:, src, start:n]
        else:
            (glob, _), (sliding, _) = self._groups(src)
            fs = self.front[src]
            for x in (self.k, self.v):
                x[glob, dst, start:n] = x[glob, src, start:n]
                x[sliding, dst, : n - lo] = x[sliding, src, lo - fs : n - fs]
            self.front[dst] = lo
        self.lengths[dst] = n
        self._requantize(dst, start, n)

    def save(self, slot: int, n: int, device: str | torch.device = "cpu") -> Entries:
        """A copy of the slot's entries for its first n token positions, in host memory by default."""
        if not self.sliding:
            return Entries(*(x[:, slot, :n].to(device, copy=True) for x in (self.k, self.v)), *self._none(device))
        f = self.front[slot]

        def copy(x: torch.Tensor, layers: list[int], m: int) -> torch.Tensor:  # (layer by layer: no device copy)
            return torch.stack([x[i, slot, :m].to(device) for i in layers]) if layers else self._none(device)[0]

        return Entries(
            *(copy(x, self.global_layers, n) for x in (self.k, self.v)),
            *(copy(x, self.sliding, max(n - f, 0)) for x in (self.k, self.v)),
            front=f,
        )

    def _none(self, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        empty = torch.empty(0, 0, *self.k.shape[3:], dtype=self.k.dtype, device=device)
        return empty, empty

    def load(self, slot: int, saved: Entries, n: int) -> None:
        """Put the entries of the first n token positions of a saved copy back into `slot`."""
        if not self.resumable(saved.front, n):
            raise ValueError(f"the saved entries' sliding layers do not hold the window before position {n}")
        if not self.sliding:
            self.k[:, slot, :n] = saved.k[:, :n]
            self.v[:, slot, :n] = saved.v[:, :n]
        else:
            (glob, _), (sliding, _) = self._groups(slot)
            m = n - saved.front
            for x, g, w in ((self.k, saved.k, saved.wk), (self.v, saved.v, saved.wv)):
                x[glob, slot, :n] = g[:, :n]
                x[sliding, slot, :m] = w[:, :m]
            self.front[slot] = saved.front
        self.lengths[slot] = n
        self._requantize(slot, 0, n)

    def _stores(self, slot: int) -> list[torch.Tensor]:
        """The tensors that hold the slot's entries: float32, and its quantized copies if it has them."""
        return [self.k, self.v] + ([self.kq, self.vq, self.ks, self.vs] if self.formats[slot] else [])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
