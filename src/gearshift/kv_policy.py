"""KV cache policies: which cached entries a sequence keeps when its cache may not hold them all.

One interface, as NVIDIA's kvpress has it: a policy *scores* the entries of every layer and KV
head, and the cache keeps the best within a *budget* (entries per layer and head), moved to the
front of the slot (`KVCache.compact`). It runs at the end of the prompt (prefill end) and, for
policies that keep going, during decoding, each time the slot has grown `slack` entries over its
budget (so compaction, a gather of the slot, is paid once per `slack` tokens, not per token).
Speculative decoding under a policy is plain decoding under it, bit for bit: a step's draft stops at
the token after which the policy would drop entries (`KVState.draft_room`), and the policy hears
the accepted rows' queries one at a time, as one-token steps would give them.

Each policy is an `Eviction` object in `EVICTIONS`: how it scores entries, its budgets per layer
and head, and its hooks (`on_prompt_end`, `on_step`), which a sequence's `KVState.after_step`
calls; the engine never asks for a policy by name, so adding one touches this file only. A
request's `KVPolicy` names the policy and its numbers.

- `streaming` (StreamingLLM): the first `sinks` entries and the most recent ones, re-rotated to
  their places in the cache as StreamingLLM does (`KVCache.compact`), so a stream can go on past
  the positions the model was trained on.
- `snapkv` (SnapKV): at prefill end, the last `window` prompt tokens' queries vote (softmax
  attention, summed over the window and over the query heads sharing the KV head, pooled over
  neighbouring positions); the window itself is kept. Nothing is dropped while decoding.
- `h2o` (H2O / Scissorhands): each entry's attention accumulated over every query it has seen
  (the prompt's window, then every decoded token); heavy hitters plus the recent window are
  kept, at prefill end and while decoding.
- `pyramid` (PyramidKV): SnapKV's scores with budgets that shrink linearly from the first layer
  (1.5x the budget) to the last (0.5x): the same total, more where attention is broad.
- `duo` (DuoAttention): retrieval heads keep every entry, the other (streaming) heads the first
  `sinks` and the most recent ones within the budget, at prefill end and while decoding. Which KV
  heads retrieve is measured once per model by `gearshift calibrate-duo` (a head file, `heads`);
  the `retrieval` fraction of heads with the highest scores keep everything.
- `int8`, `int4` (KIVI-style; `kv_cache.quantize`): a quantized copy of every entry, which attention
  reads except for the `residual` most recent (int4; int8 has none). Composes with any of the above:
  `snapkv+int4` drops with SnapKV and quantizes what is kept.

Every policy keeps the first `sinks` entries and the last `window`. Apart from `streaming`, kept
keys keep the rotation of their original positions, and new tokens continue at their true
positions (`KVCache.shift`), as kvpress does. With a budget at least the sequence's length
nothing is dropped, and the output
is the full cache's, token for token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention import holes_mask
from .errors import GearshiftError
from .kv_cache import KVCache

QUANTIZED = ("int8", "int4")


@dataclass
class KVPolicy:
    """What a request asks of its cache: a policy and a budget (entries per layer and KV head)."""

    name: str = "full"
    budget: int = 1024
    sinks: int = 4
    window: int = 32  # recent entries always kept; SnapKV's observation window
    slack: int = 64  # decoding: compact when this many entries over the budget
    pool: int = 7  # SnapKV's pooling kernel over neighbouring positions
    quant: str | None = None  # int8 / int4: also quantize what is kept (a name like "snapkv+int4" sets it)
    residual: int = 128  # int4: the most recent entries read in float32 (KIVI's residual window)
    heads: str | None = None  # duo: the head file of `gearshift calibrate-duo`
    retrieval: float = 0.25  # duo: the fraction of KV heads that keep every entry (DuoAttention: 25% for GQA)

    def __post_init__(self):
        name, _, quant = self.name.partition("+")
        if name in QUANTIZED and not quant:
            name, quant = "full", name
        if name not in EVICTIONS or (quant and quant not in QUANTIZED) or (quant and self.quant not in (None, quant)):
            raise GearshiftError(
                f"unknown kv_policy {self.name!r}; choose {', '.join(POLICIES)}, "
                f"or a policy and a quantization, e.g. snapkv+int4"
            )
        self.name, self.quant = name, quant or self.quant
        if not 0 <= self.retrieval <= 1:
            raise GearshiftError(f"kv retrieval fraction must be in [0, 1], got {self.retrieval!r}")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise GearshiftError(f"kv residual must be an integer >= 0, got {self.residual!r}")
        for f in ("budget", "window", "slack", "pool"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GearshiftError(f"kv {f} must be a positive integer, got {v!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise GearshiftError(f"kv sinks must be an integer >= 0, got {self.sinks!r}")
        if self.name != "full" and self.budget < self.sinks + self.window:
            raise GearshiftError(f"kv_budget {self.budget} is under sinks + window ({self.sinks} + {self.window})")

    @classmethod
    def of(cls, name: str | None, budget: int | None) -> "KVPolicy | None":
        """From a request's `kv_policy` / `kv_budget` (a budget alone means SnapKV); None: neither."""
        if name is None and budget is None:
            return None
        return cls(name or "snapkv", **({"budget": budget} if budget is not None else {}))

    @property
    def label(self) -> str:
        return f"{self.name}+{self.quant}" if self.quant and self.name != "full" else self.quant or self.name

    @property
    def active(self) -> bool:
        return self.name != "full" or self.quant is not None

    @property
    def evicts(self) -> bool:
        return self.name != "full"

    @property
    def recent(self) -> int:
        """Entries each row reads in float32 from a quantized slot."""
        return self.residual if self.quant == "int4" else 0

    @property
    def eviction(self) -> "Eviction":
        """What the named policy does (`EVICTIONS`)."""
        return EVICTIONS[self.name]

    def layer_budgets(self, n_layers: int) -> list[int]:
        return self.eviction.layer_budgets(self, n_layers)

    def head_budgets(self, n_layers: int, n_kv_heads: int) -> torch.Tensor:
        """[layers, KV heads] entries each head may keep."""
        return self.eviction.head_budgets(self, n_layers, n_kv_heads)

    def for_model(self, model_path: str | Path) -> "KVPolicy":
        """The policy with what it needs from the served model filled in (duo: its head file)."""
        return self.eviction.for_model(self, model_path)


def duo_path(model_path: str | Path) -> Path:
    """Where `gearshift calibrate-duo` writes a model's head file by default."""
    from .hub import home

    return home() / "duo" / f"{Path(model_path).name}.json"


_HEADS: dict[str, torch.Tensor] = {}


def retrieval_heads(p: KVPolicy, n_layers: int, n_kv_heads: int) -> torch.Tensor:
    """[layers, KV heads] bool: the heads a duo policy keeps whole (the highest-scoring `retrieval` fraction)."""
    if p.heads is None:
        raise GearshiftError("kv_policy duo needs a head file: run `gearshift calibrate-duo` first")
    if p.heads not in _HEADS:
        try:
            scores = torch.tensor(json.loads(Path(p.heads).read_text())["scores"], dtype=torch.float64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GearshiftError(f"cannot read the duo head file {p.heads}: {e}") from None
        _HEADS[p.heads] = scores
    scores = _HEADS[p.heads]
    if tuple(scores.shape) != (n_layers, n_kv_heads):
        raise GearshiftError(
            f"duo head file {p.heads} is for {tuple(scores.shape)} layers x KV heads, "
            f"this model has ({n_layers}, {n_kv_heads})"
        )
    k = round(p.retrieval * scores.numel())
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[scores.flatten().topk(k).indices] = True
    return mask.view(n_layers, n_kv_heads)


# ---------------------------------------------------------------- the policies


class Eviction:
    """An eviction policy's behaviour: the hooks `KVState.after_step` calls, and how it scores.
    The base class is the full cache (nothing dropped); a policy overrides what differs. Adding a
    policy is a subclass here and a line in `EVICTIONS`."""

    in_decode = False  # drops entries while decoding too (not only at the end of the prompt)
    needs_queries = False  # scores with the prompt window's queries
    rerotate = False  # kept keys are re-rotated to their slot positions (`KVCache.compact`)
    unbounded = False  # a sequence may run past its slot's positions (it keeps dropping old ones)

    def capture_from(self, p: KVPolicy, start: int, take: int, prompt_len: int) -> int | None:
        """Of the rows reading tokens start..start+take-1, the first whose queries to keep (None: none)."""
        if not self.needs_queries or start >= prompt_len:
            return None
        first = max(start, prompt_len - p.window)
        return first - start if first < start + take else None

    def layer_budgets(self, p: KVPolicy, n_layers: int) -> list[int]:
        return [p.budget] * n_layers

    def head_budgets(self, p: KVPolicy, n_layers: int, n_kv_heads: int) -> torch.Tensor:
        return torch.tensor(self.layer_budgets(p, n_layers), dtype=torch.float64)[:, None].repeat(1, n_kv_heads)

    def for_model(self, p: KVPolicy, model_path: str | Path) -> KVPolicy:
        return p

    def scores(self, state: KVState, cache: KVCache, slot: int, layer: int, live: torch.Tensor) -> torch.Tensor:
        """[KVH, n] how much each live entry is worth keeping (n: the slot's length)."""
        raise NotImplementedError

    def on_prompt_end(self, state: KVState, cache: KVCache, slot: int) -> None:
        compress(slot, state, cache, decoding=False)

    def on_step(
        self, state: KVState, cache: KVCache, slot: int, queries: list[torch.Tensor] | None, first: int
    ) -> None:
        """After a decoding step (queries: its rows' queries, when `capture_from` asked for them)."""
        if self.in_decode:
            compress(slot, state, cache, decoding=True)


class Recency(Eviction):
    """StreamingLLM: the first `sinks` entries and the most recent ones, re-rotated into place."""

    in_decode = rerotate = unbounded = True

    def scores(self, state, cache, slot, layer, live):
        return torch.arange(live.shape[1], device=live.device, dtype=torch.float32).expand_as(live)


class SnapKV(Eviction):
    """The prompt window's queries vote at the end of the prompt; nothing is dropped while decoding."""

    needs_queries = True

    def scores(self, state, cache, slot, layer, live):
        p, n = state.policy, live.shape[1]
        q = torch.cat(state.window[layer])
        s = attention_scores(q, cache.k[layer, slot, :n], live, state.window_first - cache.shift[slot])
        return F.avg_pool1d(s[:, None], p.pool, stride=1, padding=p.pool // 2, count_include_pad=False)[:, 0]


class Pyramid(SnapKV):
    """SnapKV's scores with budgets shrinking linearly from 1.5x (first layer) to 0.5x (last)."""

    def layer_budgets(self, p, n_layers):
        if n_layers == 1:
            return [p.budget]
        lo = p.sinks + p.window
        return [max(lo, round(p.budget * (1.5 - layer / (n_layers - 1)))) for layer in range(n_layers)]


class H2O(Eviction):
    """Heavy hitters: attention accumulated over every query an entry has seen, prompt and decode."""

    in_decode = needs_queries = True

    def capture_from(self, p, start, take, prompt_len):
        return 0 if start >= prompt_len else super().capture_from(p, start, take, prompt_len)

    def scores(self, state, cache, slot, layer, live):
        return state.acc[layer, :, : live.shape[1]]

    def on_prompt_end(self, state, cache, slot):
        if state.window:
            accumulate(slot, state, cache, [torch.cat(w) for w in state.window], state.window_first)
        super().on_prompt_end(state, cache, slot)

    def on_step(self, state, cache, slot, queries, first):
        if queries is not None:
            accumulate(slot, state, cache, queries, first, by_row=True)
        super().on_step(state, cache, slot, queries, first)


class Duo(Recency):
    """DuoAttention: retrieval heads keep everything, the others stream (no re-rotation)."""

    rerotate = unbounded = False

    def head_budgets(self, p, n_layers, n_kv_heads):
        budgets = super().head_budgets(p, n_layers, n_kv_heads)
        budgets[retrieval_heads(p, n_layers, n_kv_heads)] = math.inf
        return budgets

    def for_model(self, p, model_path):
        if p.heads is not None:
            return p
        heads = duo_path(model_path)  # this model's calibrated head file
        if not heads.exists():
            raise GearshiftError(
                f"kv_policy duo needs this model's retrieval heads: run `gearshift "
                f"calibrate-duo` first (writes {heads})"
            )
        return replace(p, heads=str(heads))


EVICTIONS: dict[str, Eviction] = {
    "full": Eviction(),
    "streaming": Recency(),
    "snapkv": SnapKV(),
    "h2o": H2O(),
    "pyramid": Pyramid(),
    "duo": Duo(),
}
POLICIES = tuple(EVICTIONS) + QUANTIZED  # and EVICTION+QUANTIZED, e.g. snapkv+int4


@dataclass
class KVState:
    """One sequence's policy state: the prompt window's queries (per layer, and the token position
    of the first), H2O's accumulated attention (per layer, KV head and slot position), and
    whether the end of the prompt has been handled."""

    policy: KVPolicy
    window: list[list[torch.Tensor]] = field(default_factory=list)
    window_first: int | None = None
    acc: torch.Tensor | None = None  # h2o: [layers, KVH, max_len]
    prompt_done: bool = False
    compactions: int = 0

    @property
    def unbounded(self) -> bool:
        return self.policy.eviction.unbounded

    def capture_from(self, start: int, take: int, prompt_len: int) -> int | None:
        """Of the rows reading tokens start..start+take-1, the first whose queries to keep (None: none)."""
        return self.policy.eviction.capture_from(self.policy, start, take, prompt_len)

    def draft_room(self, cache: KVCache, slot: int) -> int | None:
        """How many draft tokens a step may add (None: no limit). Plain decoding lets the policy drop
        entries right after the token that ends the prompt and, while decoding, after the one that
        takes a head past its budget plus slack; a draft that ran past that token would read entries
        plain decoding no longer has, so a step stops there and greedy output under a policy stays
        the output without a drafter."""
        p = self.policy
        if not p.evicts:
            return None
        if not self.prompt_done:
            return 0  # the step that ends the prompt
        if not p.eviction.in_decode:
            return None
        budgets = p.head_budgets(cache.k.shape[0], cache.k.shape[3])
        room = float((budgets + p.slack - _held(cache, slot)).min())
        return max(0, int(room)) if math.isfinite(room) else None

    def absorb(self, queries: list[torch.Tensor], first: int) -> None:
        """Queries of prompt rows from token position `first` on (chunks arrive in order)."""
        if not self.window:
            self.window, self.window_first = [[] for _ in queries], first
        for per_layer, q in zip(self.window, queries):
            per_layer.append(q)

    def after_step(
        self, cache: KVCache, slot: int, queries: list[torch.Tensor] | None, first: int, computed: int, prompt_len: int
    ) -> None:
        """After the sequence's step (its slot holds `computed` tokens; `queries` from token position
        `first` on): keep the prompt window's queries; at the end of the prompt, and then while
        decoding, let the policy drop entries."""
        eviction = self.policy.eviction
        if self.prompt_done:
            eviction.on_step(self, cache, slot, queries, first)
            return
        if queries is not None:
            self.absorb(queries, first)
        if computed < prompt_len:
            return
        self.prompt_done = True
        eviction.on_prompt_end(self, cache, slot)
        self.window = []


def attention_scores(q: torch.Tensor, keys: torch.Tensor, live: torch.Tensor, first: int) -> torch.Tensor:
    """Softmax attention of queries q [w, H, D] (at slot positions first..first+w-1) over keys
    [n, KVH, D] (`live` [KVH, n]: entries that exist), summed over the rows and the query heads of
    each KV head: [KVH, n] float32."""
    w, h, d = q.shape
    n, kvh, _ = keys.shape
    qg = q.float().view(w, kvh, h // kvh, d).permute(1, 0, 2, 3).reshape(kvh, -1, d)  # [KVH, w*G, D]
    logits = qg @ keys.float().permute(1, 2, 0) / math.sqrt(d)  # [KVH, w*G, n]
    pos = torch.arange(n, device=q.device)
    row_pos = (first + torch.arange(w, device=q.device)).repeat_interleave(h // kvh)  # [w*G]
    visible = (pos[None, :] <= row_pos[:, None])[None] & live[:, None, :]
    logits = logits.masked_fill(~visible, -math.inf)
    return logits.softmax(-1).nan_to_num().sum(1)


def _live(cache: KVCache, layer: int, slot: int, n: int) -> torch.Tensor:
    """[KVH, n] bool: the slot positions below n that hold an entry, per KV head."""
    mask = holes_mask(cache, layer, slot)
    if mask is None:
        return torch.ones(cache.k.shape[3], n, dtype=torch.bool, device=cache.k.device)
    return mask[0, :, 0, :n]


def _select(scores: torch.Tensor, live: torch.Tensor, budgets: torch.Tensor, p: KVPolicy) -> list[torch.Tensor]:
    """Per KV head: its budget's best live positions, sinks and the recent window always in, ascending."""
    n = scores.shape[1]
    s = scores.clone()
    protect = torch.zeros(n, dtype=torch.bool, device=s.device)
    protect[: p.sinks] = True
    protect[max(0, n - p.window) :] = True
    s[:, protect] = math.inf
    s = s.masked_fill(~live, -math.inf)
    out = []
    for head in range(s.shape[0]):
        k = int(min(budgets[head].item(), live[head].sum().item()))
        out.append(s[head].topk(k).indices.sort().values)
    return out


def _held(cache: KVCache, slot: int) -> torch.Tensor:
    """[layers, KVH] the entries each head of the slot holds."""
    n = cache.lengths[slot]
    h = cache.holes[:, slot].cpu()
    return n - (h[..., 1].clamp(max=n) - h[..., 0]).clamp(min=0)


def compress(seq_slot: int, state: KVState, cache: KVCache, decoding: bool) -> bool:
    """Apply the policy to the slot now if it is due; returns whether entries were dropped."""
    p = state.policy
    eviction = p.eviction
    n = cache.lengths[seq_slot]
    if not p.evicts:
        return False
    budgets = p.head_budgets(cache.k.shape[0], cache.k.shape[3])
    held = _held(cache, seq_slot)
    if decoding:
        if not eviction.in_decode or not bool((held > budgets + p.slack).any()):
            return False
    elif bool((held <= budgets).all()):
        return False  # the whole prompt fits: keep everything (h2o's scores still start from the window)
    keep = []
    for layer in range(len(budgets)):
        live = _live(cache, layer, seq_slot, n)
        keep.append(_select(eviction.scores(state, cache, seq_slot, layer, live), live, budgets[layer], p))
    if state.acc is not None:  # the accumulated scores follow their entries
        acc = torch.zeros_like(state.acc)
        for layer, per_layer in enumerate(keep):
            for head, idx in enumerate(per_layer):
                acc[layer, head, : len(idx)] = state.acc[layer, head, idx]
        state.acc = acc
    cache.compact(seq_slot, keep, rerotate=eviction.rerotate)
    state.compactions += 1
    return True


def accumulate(
    seq_slot: int, state: KVState, cache: KVCache, queries: list[torch.Tensor], first: int, by_row: bool = False
) -> None:
    """H2O: add the attention that queries (rows from token position `first` on) paid to each entry."""
    n = cache.lengths[seq_slot]
    layers, _, _, kvh, _ = cache.k.shape
    if state.acc is None:
        state.acc = torch.zeros(layers, kvh, cache.max_len, device=cache.k.device)
    start = first - cache.shift[seq_slot]
    for layer, q in enumerate(queries):
        live = _live(cache, layer, seq_slot, n)
        # a decoding step's rows one at a time, each over the keys up to its own: the shapes and sums
        # of one-token steps, so a speculative step adds the bits plain decoding's steps add
        for a, b in [(i, i + 1) for i in range(len(q))] if by_row else [(0, len(q))]:
            m = start + b if by_row else n
            state.acc[layer, :, :m] += attention_scores(q[a:b], cache.k[layer, seq_slot, :m], live[:, :m], start + a)
