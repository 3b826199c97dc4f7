"""Which rows see which cache entries, and how attention is computed: the one place for it.

A forward runs a `Batch`: the rows of several `Segment`s (one per sequence, each for its own KV
cache slot) flattened into one [tokens, dim] activation, so every linear layer runs once for all
of them. Attention cannot be shared across sequences; it is computed here.

The exactness policy is explicit: `cached` attends every row on its own, exactly as a one-token
decode step attends its token (the row's query against its slot's first n entries). So a row's
result depends only on its sequence's tokens up to it, never on how the work was cut: what else
shares the step, how a prompt was chunked, or whether a prefix came from the prefix cache. With
the row-independent packed int4/int8 kernels (`model.Linear`) that makes whole forwards exact:
greedy output in a continuous batch, after a prefix-cache hit, or under speculative decoding is
token for token the output of one sequence decoded alone. Two implementations keep that promise,
and a process uses one of them throughout: the native kernel (`kernels.attend`, every row of a
step in one call per layer, for float32 caches on a CPU) and, where it is unavailable, one
PyTorch attention call per row. Batched attention over many rows (one masked call per sequence)
rounds differently per chunking; it is only used by `causal`, the training forward, where
nothing is cached.

A sliding-window layer (`KVCache.windows`, Gemma 3) attends, for each row, only the last `window`
positions up to its own (a tree node: up to its depth below the root), the positions transformers'
and llama.cpp's masks give it; it holds only what rows can still see, from token position
`KVCache.front[slot]` on at the front of the slot, so its writes, rows and reads are all that many
positions lower (`Batch.native_io`, `KVCache.offset`).

Token trees (speculative decoding) are rows too: a tree node sits at its depth below the root,
and before it attends, its ancestors' entries are laid out after the prefix exactly as plain
decoding of that path would have them; afterwards the entries are left in node order for
`KVCache.keep` to compact the accepted path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels
from .kv_cache import KVCache


@dataclass
class Segment:
    """Tokens for one cache slot, appended after the slot's current length.

    With `parents`, the last len(parents) tokens are a tree below the token before them (the
    root, itself a plain row): `parents` as in `Proposal.parents`, 0 = the root. Rows from
    `logits_from` on return logits (None: no row does, e.g. a prefill chunk)."""

    slot: int
    tokens: list[int]
    parents: list[int] | None = None
    logits_from: int | None = None
    capture_from: int | None = None  # keep the queries of rows from this one on (a KV policy scores with them)
    features: bool = False  # keep every row's last-block output (the target features a draft head reads)


def tree_paths(parents: list[int]) -> list[list[int]]:
    """Root-to-node index paths of a tree given as parent indices in topological order."""
    paths: list[list[int]] = []
    for i, par in enumerate(parents):
        if (i == 0) != (par == -1) or par >= i:
            raise ValueError("tree nodes must come in topological order with one root first")
        paths.append([0] if i == 0 else paths[par] + [i])
    return paths


@dataclass
class _Run:
    """A segment as rows of the flat batch: where its rows start, where its entries go."""

    slot: int
    row: int  # first row of the segment in the batch
    start: int  # cache position of its first token
    n_plain: int  # rows attended as a chain (the root of a tree included)
    paths: list[list[int]] | None  # tree: node paths, root (node 0) = the last plain row


class Batch:
    """Segments flattened for one forward: token ids, RoPE positions, cache write positions,
    and the rows whose outputs are returned, all built once per step.

    `exact=False` is the batched mode: each segment's rows attend in one masked PyTorch call
    (`batched`), which rounds differently with the number of rows, so a result can depend on how
    the work was cut (at near ties only; see the README for when it pays)."""

    def __init__(self, segments: list[Segment], cache: KVCache, exact: bool = True):
        dev = cache.k.device
        if len({s.slot for s in segments}) != len(segments):
            raise ValueError("two segments of one batch write the same cache slot")
        tokens, positions, write, out, runs = [], [], [], [], []
        self.out_slices: list[slice] = []  # per segment: its rows in the output
        self.capture: dict[int, slice] = {}  # segment index -> its rows whose queries are kept
        self.feature_rows: dict[int, slice] = {}  # segment index -> its rows in `features`
        feature_index: list[int] = []
        for i, seg in enumerate(segments):
            start, row = cache.lengths[seg.slot], len(tokens)
            # RoPE takes token positions; the cache, slot positions (a re-rotated slot: slot positions too)
            shift = 0 if cache.rope_at_slot[seg.slot] else cache.shift[seg.slot]
            n_tree = len(seg.parents) if seg.parents is not None else 0
            n_plain = len(seg.tokens) - n_tree
            if n_plain < 1 or not seg.tokens:
                raise ValueError("a segment needs at least one token before its tree")
            if start + len(seg.tokens) > cache.max_len:
                raise ValueError(f"sequence of {start + len(seg.tokens)} tokens exceeds the cache ({cache.max_len})")
            paths = tree_paths([-1] + list(seg.parents)) if n_tree else None
            root = start + n_plain - 1
            tokens += seg.tokens
            positions += range(start + shift, start + n_plain + shift)
            if paths:
                positions += [root + shift + len(p) - 1 for p in paths[1:]]  # a tree node's position: its depth
            if seg.features:
                self.feature_rows[i] = slice(len(feature_index), len(feature_index) + len(seg.tokens))
                feature_index += range(row, row + len(seg.tokens))
            if seg.capture_from is not None:  # drafts too: the engine keeps the accepted path's
                self.capture[i] = slice(row + seg.capture_from, row + len(seg.tokens))
            write += range(seg.slot * cache.max_len + start, seg.slot * cache.max_len + start + len(seg.tokens))
            first = len(out)
            if seg.logits_from is not None:
                out += range(row + seg.logits_from, row + len(seg.tokens))
            self.out_slices.append(slice(first, len(out)))
            runs.append(_Run(seg.slot, row, start, n_plain, paths))
        self.segments, self.runs, self.exact = segments, runs, exact
        self.queries: list[torch.Tensor] = []  # per layer, the captured rows' queries (RoPE applied)
        self.feature_index = torch.tensor(feature_index, device=dev) if feature_index else None
        self.features: torch.Tensor | None = None  # set by the forward: [feature rows, dim]
        self.holes = cache.holes if any(cache.compacted[s.slot] for s in segments) else None
        # quantized slots: per format, the batch rows whose entries get a quantized copy, and where
        groups: dict[str, tuple[list[int], list[int]]] = {}
        for seg, run in zip(segments, runs):
            if fmt := cache.formats[seg.slot]:
                rows_, at = groups.setdefault(fmt, ([], []))
                rows_ += range(run.row, run.row + len(seg.tokens))
                at += range(
                    seg.slot * cache.max_len + run.start, seg.slot * cache.max_len + run.start + len(seg.tokens)
                )
        self.quantized = [
            (fmt, torch.tensor(r, device=dev), torch.tensor(w, device=dev)) for fmt, (r, w) in groups.items()
        ]
        self.paths = kernels.paths(cache.k.device.type, cache.k.dtype)
        native = exact and self.paths.attention
        self.native = (kernels.attend_q() if self.quantized else kernels.attend()) if native else None
        self._sliding: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        front = torch.tensor([cache.front[s.slot] for s in segments], dtype=torch.long)  # per segment
        # per row: what a sliding layer subtracts from its positions (None: nothing)
        self.row_front = (
            front.repeat_interleave(torch.tensor([len(s.tokens) for s in segments])) if front.any() else None
        )
        if self.native is not None:
            self.native_rows, self.native_extra = self._native_rows()
        self.tokens = torch.tensor(tokens, device=dev)
        self.positions = torch.tensor(positions, device=dev)
        self.write = torch.tensor(write, device=dev)
        self.write_sliding = self.write if self.row_front is None else self.write - self.row_front.to(dev)
        self.out = None if len(out) == len(tokens) else torch.tensor(out, dtype=torch.long, device=dev)
        self.masks = None if exact else [self._mask(run, len(seg.tokens), dev) for seg, run in zip(segments, runs)]

    @staticmethod
    def _mask(run: _Run, n: int, dev: torch.device) -> torch.Tensor:
        """Batched mode: which of positions 0..start+n-1 each of a segment's n rows attends (a chain
        row: everything up to itself; a tree node: the prefix up to the root, then its ancestors,
        whose entries sit in node order after the root)."""
        end = run.start + n
        mask = torch.arange(end)[None, :] <= torch.arange(run.start, end)[:, None]
        if run.paths:
            base = run.start + run.n_plain - 1
            mask[run.n_plain :, base + 1 :] = False
            for node, path in enumerate(run.paths[1:], start=1):
                mask[run.n_plain - 1 + node, [base + a for a in path[1:]]] = True
        return mask.to(dev)

    def _native_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For the native kernel: per row (slot, n, e0, e1): it attends positions 0..n-1 of its slot,
        then extra[e0:e1] (a tree node's ancestors below the root, and itself, where they were written)."""
        rows, extra, self._extra_row = [], [], []
        for run in self.runs:
            rows += [(run.slot, run.start + i + 1, 0, 0) for i in range(run.n_plain)]
            base = run.start + run.n_plain - 1
            for path in (run.paths or [])[1:]:
                rows.append((run.slot, base + 1, len(extra), len(extra) + len(path) - 1))
                extra += [base + node for node in path[1:]]
                self._extra_row += [len(rows) - 1] * (len(path) - 1)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(extra, dtype=torch.long)

    def native_io(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's write positions, native rows and extra entries. A sliding-window layer's are
        made once per step: rows get a fifth column, the first position each attends (its keys are
        positions lo..n-1 and then its extra entries), and every position is in the layer's slot
        positions (`KVCache.front` lower)."""
        if window is None:
            return self.write, self.native_rows, self.native_extra
        if window not in self._sliding:
            r = self.native_rows.clone()
            pos = r[:, 1] + r[:, 3] - r[:, 2]  # keys the row sees without a window (itself included)
            r[:, 2] = torch.maximum(r[:, 2], r[:, 3] - window)  # a node deeper than the window: its last ancestors
            r = torch.cat([r, (pos - window).clamp(min=0)[:, None]], 1)
            extra = self.native_extra
            if self.row_front is not None:
                r[:, 1] -= self.row_front
                r[:, 4] = (r[:, 4] - self.row_front).clamp(min=0)
                extra = extra - self.row_front[torch.tensor(self._extra_row, dtype=torch.long)]
            self._sliding[window] = (self.write_sliding, r.contiguous(), extra)
        return self._sliding[window]

    def advance(self, cache: KVCache) -> None:
        """After the forward wrote every segment's entries: its slot now holds them (trees in node
        order). The caller moves the lengths on (the model runner, `Transformer.run`), not the model."""
        for seg, run in zip(self.segments, self.runs):
            cache.lengths[seg.slot] = run.start + len(seg.tokens)


def cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int, batch: Batch) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] (RoPE applied): write k/v into the slots, attend every row exactly."""
    window = cache.windows[layer]
    write = batch.write if window is None else batch.write_sliding
    rows_k, rows_v = cache.rows[layer]
    rows_k.index_copy_(0, write, k)
    rows_v.index_copy_(0, write, v)
    if batch.quantized:  # the quantized copies of rows in quantized slots
        if batch.native is not None:
            torch.ops.gearshift.quantize_into(k, v, batch.write, *cache.quantized_layer(layer))
        else:
            for fmt, rows, at in batch.quantized:
                cache.write_quantized(layer, fmt, at, k[rows], v[rows])
    if batch.capture:
        batch.queries.append(torch.cat([q[rows] for rows in batch.capture.values()]))
    if batch.native is not None:
        holes = batch.holes[layer] if batch.holes is not None else NO_HOLES
        quant = cache.quantized_layer(layer) if batch.quantized else ()
        _, rows, extra = batch.native_io(window)
        return batch.native(q, cache.k[layer], cache.v[layer], rows, extra, holes, *quant)
    if not batch.exact:
        return batched(q, cache, layer, batch)
    t, h, d = q.shape
    kvh = k.shape[1]
    qg = q.view(t, 1, kvh, h // kvh, d)  # a KV head's query heads as query rows: no GQA expansion
    out = []
    for run in batch.runs:
        live = holes_mask(cache, layer, run.slot)
        off = cache.offset(layer, run.slot)  # (a sliding layer's slot positions are lower)
        for i in range(run.n_plain):
            n = run.start + i + 1 - off
            keys, values = cache.read(layer, run.slot, n, live)  # [1, KVH, n, D]
            mask = _row_mask(live, n, window, keys.device)
            out.append(F.scaled_dot_product_attention(qg[run.row + i], keys, values, attn_mask=mask))
        if run.paths:
            out += _tree_rows(qg, k, v, cache, layer, run, live, window, off)
    return torch.stack(out).view(t, h, d)


def _row_mask(live: torch.Tensor | None, n: int, window: int | None, dev: torch.device) -> torch.Tensor | None:
    """Which of a row's n keys it attends ([1, KVH or 1, 1, n]; None: all): the live ones (`holes_mask`),
    and in a sliding-window layer the last `window` (a tree node's keys are laid out as plain decoding
    of its path has them, so the same holds for it)."""
    mask = None if live is None else live[..., :n]
    if window is None or n <= window:
        return mask
    keep = (torch.arange(n, device=dev) >= n - window)[None, None, None]
    return keep if mask is None else mask & keep


NO_HOLES = torch.empty(0, dtype=torch.int64)
NO_QUANT = (NO_HOLES,) * 5  # the fused block's quantized-copy arguments when the step has none


def holes_mask(cache: KVCache, layer: int, slot: int) -> torch.Tensor | None:
    """[1, KVH, 1, max_len] bool: the slot positions each KV head attends (None: all, no holes)."""
    if not cache.compacted[slot]:
        return None
    h = cache.holes[layer, slot]  # [KVH, 2]
    pos = torch.arange(cache.max_len, device=h.device)
    return ((pos < h[:, :1]) | (pos >= h[:, 1:]))[None, :, None]


def _tree_rows(
    qg, k, v, cache: KVCache, layer: int, run: _Run, live, window: int | None, off: int
) -> list[torch.Tensor]:
    """Attend tree nodes 1.. (node 0, the root, was attended as a plain row): each sees the prefix
    and its ancestors laid out after the root as plain decoding of its path has them."""
    slot_keys, slot_values, fmt = cache.k[layer, run.slot], cache.v[layer, run.slot], cache.formats[run.slot]

    def lay(at: int, idx: torch.Tensor) -> None:  # rows idx of this step into slot positions at, at + 1, ...
        slot_keys[at : at + len(idx)] = k[idx]
        slot_values[at : at + len(idx)] = v[idx]
        if fmt:
            cache.write_quantized(
                layer, fmt, run.slot * cache.max_len + at + torch.arange(len(idx), device=k.device), k[idx], v[idx]
            )

    base = run.start + run.n_plain - 1 - off  # the root's slot position; nodes were written at base + node
    first = run.row + run.n_plain - 1  # the root's row
    laid = list(range(len(run.paths)))  # which node's entries sit at base, base + 1, ...
    rows = []
    for node in range(1, len(run.paths)):
        path = run.paths[node]
        d = next((j for j, (a, b) in enumerate(zip(laid, path)) if a != b), len(path))
        if d < len(path):
            lay(base + d, torch.tensor(path[d:], device=k.device) + first)
            laid[d : len(path)] = path[d:]
        n = base + len(path)
        keys, values = cache.read(layer, run.slot, n, live)
        mask = _row_mask(live, n, window, keys.device)
        rows.append(F.scaled_dot_product_attention(qg[first + node], keys, values, attn_mask=mask))
    if laid != list(range(len(run.paths))):  # leave the entries in node order for the caller to compact
        lay(base, torch.arange(first, first + len(laid), device=k.device))
    return rows


def batched(q: torch.Tensor, cache: KVCache, layer: int, batch: Batch) -> torch.Tensor:
    """The batched mode: one masked attention call per segment over its slot (its entries are
    already written), all its rows and query heads at once."""
    out = []
    for run, seg, mask in zip(batch.runs, batch.segments, batch.masks):
        n = len(seg.tokens)
        end = run.start + n
        qr = q[run.row : run.row + n].transpose(0, 1)[None]  # [1, H, n, D]
        live = holes_mask(cache, layer, run.slot)
        off = cache.offset(layer, run.slot)  # (a sliding layer holds token positions off.. only)
        keys, values = cache.read(layer, run.slot, end - off, live)  # (quantized: as the segment's last row sees them)
        if cache.windows[layer] is not None:  # each row: the window before its own position, inclusive
            # (a tree node's ancestors sit in node order, not at their depths: exact only for trees
            # shallower than the window, which every drafter's are; this mode is not exact anyway)
            seen = mask.sum(-1, keepdim=True) if not run.paths else _seen(run, n, mask.device)
            mask = (mask & (torch.arange(end, device=mask.device)[None] >= seen - cache.windows[layer]))[:, off:]
        if live is not None:  # per KV head, repeated for its query heads
            mask = mask & live[0, :, :, :end].repeat_interleave(q.shape[1] // keys.shape[1], dim=0)
        y = F.scaled_dot_product_attention(qr, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != keys.shape[1])
        out.append(y[0].transpose(0, 1))
    return torch.cat(out)


def _seen(run: _Run, n: int, dev: torch.device) -> torch.Tensor:
    """[n, 1]: per row of a segment with a tree, the keys it sees without a window (chain rows:
    positions up to themselves; a tree node: the prefix up to the root and its path below it)."""
    seen = [run.start + i + 1 for i in range(run.n_plain)]
    seen += [run.start + run.n_plain - 1 + len(p) for p in run.paths[1:]]
    return torch.tensor(seen, device=dev)[:, None]


def causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, s: int, window: int | None = None
) -> torch.Tensor:
    """Training: whole sequences [b, s], nothing cached, one batched causal call (autograd-friendly);
    a sliding-window layer sees the last `window` positions up to each row's."""
    _, h, d = q.shape
    kvh = k.shape[1]
    q, k, v = (x.view(b, s, -1, d).transpose(1, 2) for x in (q, k, v))
    mask = None
    if window is not None and s > window:
        i = torch.arange(s, device=q.device)
        mask = (i[None] <= i[:, None]) & (i[None] > i[:, None] - window)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=mask is None, attn_mask=mask, enable_gqa=h != kvh)
    return y.transpose(1, 2).reshape(b * s, h, d)
