"""EAGLE: a draft head that reads the target's own features, drafting a dynamic tree.

The head (Li et al., EAGLE, 2024) is one transformer block over [the target's last-block output
(its *feature*) at position i ; the embedding of token i+1], which predicts the feature at i+1;
the target's final norm and LM head turn a feature into next-token logits. Features carry far
more than the token ids a small draft model sees, so one block drafts well. Three choices keep it
cheap on a CPU:

- a trimmed vocabulary (FR-Spec, Zhao et al. 2025): the draft scores only the `vocab` most
  frequent tokens of the target's own outputs (rows of the target's LM head, exactly as the
  target computes them); verification stays full-vocabulary, so nothing is lost;
- a dynamic tree (EAGLE-2): expand the `width` most likely nodes of each depth by their
  cumulative draft probability, then keep the best nodes overall, as many as the measured
  forward-cost curve says pay (`TreeDrafter`'s sizing);
- an early stop (SpecDec++'s idea): drafting ends at the depth where no node is still likely
  enough (`stop_below`), so an unsure head costs little.

The head keeps its own small KV cache over the context (one block: a few kilobytes per token),
appended as the target's features arrive (`see`, from the model runner) and never rolled back:
tree rows are scored against it with an explicit ancestor mask and then dropped. Positions whose
features never arrived (a prompt prefix served from the prefix cache) are skipped: the head then
reads the context from the first position it has features for.

Drafts are deterministic (the tree's tokens, no draft distribution), so greedy output equals
plain decoding and sampled output keeps the target's distribution (`verify`).
`gearshift distill --head eagle` trains one (`tools/eagle.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import GearshiftError
from ..hardware import CostModel
from ..model import Block, Linear, RMSNorm, Transformer, rope_inv_freq
from ..sampling import SamplingParams
from .base import DraftLength, Proposal, Verdict


class EagleHead(nn.Module):
    """fc([feature ; embedding]) -> one block -> a feature; `logits` scores the trimmed vocabulary."""

    def __init__(self, target: Transformer, vocab: torch.Tensor):
        super().__init__()
        cfg = target.cfg
        self.cfg = cfg
        self.in_norm = RMSNorm(cfg.dim, cfg.norm_eps)  # features are large and uneven: normalise them first
        self.fc = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, "float32")
        g = torch.Generator().manual_seed(0)  # (training starts it from the target's last block instead)
        for lin in (self.block.qkv, self.block.o, self.block.gate_up, self.block.down):
            lin.weight = torch.randn(lin.weight.shape, generator=g) * 0.02
            if lin.bias is not None:
                lin.bias = torch.zeros_like(lin.bias)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # starts as the target's final norm
        self.register_buffer("vocab", vocab.long())
        self.register_buffer("lm_head", target_lm_rows(target, vocab))  # [V', dim], frozen
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.packed: Linear | None = None  # the trimmed LM head for decoding (`pack`)

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions[:, None].float() * self.inv_freq
        return torch.polar(torch.ones_like(freqs), freqs)[:, None]

    def step(self, feats: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """Rows [n, dim] of (feature, next token's embedding) -> predicted next features [n, dim]."""
        x = self.fc(torch.cat([self.in_norm(feats), embeds], dim=-1))
        return self.block(x, self.rotation(positions), attend)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted features [n, dim] -> logits over the trimmed vocabulary [n, V'] (float32)."""
        if self.packed is not None:
            return self.packed(self.norm(h)).float()
        return F.linear(self.norm(h), self.lm_head).float()

    def pack(self) -> EagleHead:
        """For decoding: the block's linears and the trimmed LM head as int8 on the native kernels
        (where a device has them), so a draft step reads a quarter of the bytes: the LM head rows
        are the target's int8 weights already, and a draft only has to be likely, not exact."""
        dev = self.lm_head.device
        if not kernels.paths(dev.type, torch.float32).linear:
            return self
        packed = Block(self.cfg, "int8")
        for name in ("attn_norm", "mlp_norm"):
            getattr(packed, name).weight = getattr(self.block, name).weight.detach().float().clone()
        for name in ("qkv", "o", "gate_up", "down"):
            lin = getattr(self.block, name)
            getattr(packed, name).set_weight(lin.weight.detach().float(), None if lin.bias is None else lin.bias)
        self.block = packed.to(dev)
        self.packed = Linear(self.cfg.dim, len(self.vocab), "int8")
        self.packed.set_weight(self.lm_head)
        self.packed.to(dev)
        return self


def target_lm_rows(target: Transformer, vocab: torch.Tensor) -> torch.Tensor:
    """Rows of the target's LM head for `vocab`, as the target computes them (its quantized weights,
    read back through its own kernel), float32 [len(vocab), dim]."""
    with torch.no_grad():  # (not inference mode: training uses these rows under autograd)
        eye = torch.eye(target.cfg.dim, device=target.device)
        w = target.lm_head(eye).float().T  # [V, dim]
        return w[vocab.to(w.device).long()].contiguous()


def make_trainable(head: EagleHead) -> EagleHead:
    """The head's float buffers (norms, block weights) as parameters; the LM head rows stay frozen."""
    for module in [head.in_norm, head.norm, *head.block.modules()]:
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point():
                setattr(module, name, nn.Parameter(buf.detach().clone()))
    return head


def save_head(head: EagleHead, target_path: Path, out: Path, extra: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in head.state_dict().items() if k != "lm_head"}
    save_file(state, str(out / "eagle.safetensors"))
    meta = {"base": str(Path(target_path).resolve()), "vocab": int(head.vocab.numel()), **extra}
    (out / "config.json").write_text(json.dumps({"gearshift_eagle": meta}, indent=1))


def load_head(path: Path, target_path: Path, target: Transformer) -> EagleHead:
    """An EAGLE head trained by `gearshift distill --head eagle` for the model at `target_path`."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((Path(path) / "config.json").read_text())["gearshift_eagle"]
        state = load_file(str(Path(path) / "eagle.safetensors"))
    except (OSError, ValueError, KeyError) as e:
        raise GearshiftError(f"{path} is not an EAGLE head from gearshift distill --head eagle: {e}") from None
    if Path(meta["base"]).resolve() != Path(target_path).resolve():
        raise GearshiftError(f"{path} was trained for {meta['base']}, not {target_path}")
    head = EagleHead(target, state["vocab"])
    head.load_state_dict(state, strict=False)
    return head.to(target.device).eval().requires_grad_(False).pack()


class EagleDrafter:
    reads_features = True  # the model runner hands the target's features to `see`

    def __init__(
        self,
        head: EagleHead,
        embed: Callable[[torch.Tensor], torch.Tensor],
        name: str,
        costs: CostModel | None = None,
        max_nodes: int = 32,
        depth: int = 6,
        width: int = 4,
        stop_below: float = 0.02,
    ):
        self.head, self.embed, self.name, self.costs = head, embed, name, costs
        self.max_nodes, self.depth, self.width, self.stop_below = max_nodes, depth, width, stop_below
        self.length = DraftLength(k=max_nodes, k_min=max_nodes, k_max=max_nodes)  # sized per step instead
        cfg = head.cfg
        self.kvh, self.hd = cfg.n_kv_heads, cfg.head_dim
        self.feats: torch.Tensor | None = None  # [positions, dim]: the target's features, by position
        self.have = 0  # features known for positions < have
        self.first = 0  # the first position with a feature (a prefix-cache hit has none before it)
        self.k = self.v = None  # the head's cache over context pairs, [positions, KVH, D]
        self.done = 0  # context pairs the head has read (pair i at position i)
        self.pending: torch.Tensor | None = None  # the last draft's features, per node, until the verdict
        self.root = 0  # position of the last draft's root
        self.per_depth = 1e-3  # seconds a depth of drafting takes (a running mean): the cost of going deeper

    def fork(self) -> EagleDrafter:
        return EagleDrafter(
            self.head, self.embed, self.name, self.costs, self.max_nodes, self.depth, self.width, self.stop_below
        )

    def reset(self, prompt: list[int]) -> None:
        n = min(self.head.cfg.max_seq_len, len(prompt) + 4096)
        dev = self.head.norm.weight.device
        if self.feats is None or len(self.feats) < n:
            self.feats = torch.zeros(n, self.head.cfg.dim, device=dev)
            self.k = torch.zeros(n, self.kvh, self.hd, device=dev)
            self.v = torch.zeros(n, self.kvh, self.hd, device=dev)
        self.have = self.first = self.done = 0
        self.pending = None

    # ------------------------------------------------------------------ the target's features

    def see(self, start: int, take: int, features: torch.Tensor) -> None:
        """Features of positions start..start+take-1, then (a verification step) of the draft's nodes."""
        if start > self.have:  # positions skipped (served from the prefix cache): start reading here
            self.first = self.done = start
        end = min(start + take, len(self.feats))
        self.feats[start:end] = features[: end - start].float()
        self.have = max(self.have, end)
        self.pending = features[take:].float() if len(features) > take else None
        self.root = start + take - 1

    def observe(self, verdict: Verdict, target_logits: torch.Tensor) -> None:
        """The accepted draft nodes' features become context (their rows were the target's own)."""
        if self.pending is None or not verdict.path:
            return
        at = self.root + 1
        n = min(len(verdict.path), len(self.feats) - at)
        self.feats[at : at + n] = self.pending[verdict.path[:n]]
        self.have = max(self.have, at + n)
        self.pending = None

    # ------------------------------------------------------------------ drafting

    def _ctx_attend(self, rows_pos: torch.Tensor):
        """Attention for context rows (causal over the head's cache), writing their keys and values."""

        def attend(q, k, v):
            n = len(q)
            lo, hi = self.done, self.done + n
            self.k[lo:hi], self.v[lo:hi] = k, v
            keys, values = self.k[self.first : hi], self.v[self.first : hi]
            pos = torch.arange(self.first, hi, device=q.device)
            mask = pos[None, :] <= rows_pos[:, None]
            return _attend(q, keys, values, mask)

        return attend

    def _tree_attend(self, tree_k: list, tree_v: list, anc: torch.Tensor):
        """Attention for tree rows: the context, then their own ancestors' rows and themselves."""

        def attend(q, k, v):
            tree_k.append(k)
            tree_v.append(v)
            keys = torch.cat([self.k[self.first : self.done], *tree_k])
            values = torch.cat([self.v[self.first : self.done], *tree_v])
            ctx = torch.ones(len(q), self.done - self.first, dtype=torch.bool, device=q.device)
            return _attend(q, keys, values, torch.cat([ctx, anc], dim=1))

        return attend

    @torch.inference_mode()
    def propose(self, context: list[int], k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        last = len(context) - 1  # the root's position; features are known before it
        # (done >= last: nothing new since the last draft, which a step loop never asks for)
        if k <= 0 or self.have < last or last < 1 or self.done >= last or last + self.depth + 1 >= len(self.feats):
            return Proposal([])
        head, dev = self.head, self.head.norm.weight.device
        t0 = time.perf_counter()
        # the context pairs (feature i, token i+1) not read yet, the root's pair last
        pos = torch.arange(self.done, last, device=dev)
        ids = torch.tensor(context[self.done + 1 : last + 1], device=dev)
        h_root = head.step(self.feats[self.done : last], self.embed(ids), pos, self._ctx_attend(pos))[-1:]
        self.done = last
        # the tree: nodes in creation order (parents first), scores = cumulative draft probability
        tokens, parents, scores = [], [], []
        tree_k, tree_v = [], []
        rows = 0  # tree rows the head has run (each attends its ancestors' rows and its own)
        # (node, head output that predicts its children, score, the head rows on its path)
        frontier = [(-1, h_root[0], 1.0, [])]
        for depth in range(min(self.depth, k)):
            logits = head.logits(torch.stack([f[1] for f in frontier]))
            p = logits.softmax(-1)
            top = p.topk(self.width, dim=-1)
            new = []
            for (node, _, score, path), vals, idx in zip(frontier, top.values.tolist(), top.indices.tolist()):
                for pv, ti in zip(vals, idx):
                    s = score * pv
                    tokens.append(int(head.vocab[ti]))
                    parents.append(node + 1)  # proposal nodes: 0 = root, draft i = node i + 1
                    scores.append(s)
                    new.append((len(tokens) - 1, s, path))
            if depth + 1 == min(self.depth, k):
                break
            new.sort(key=lambda x: -x[1])
            grow = [x for x in new[: self.width] if x[1] >= self.stop_below]
            if not grow:  # the head is unsure of everything deeper: stop drafting (SpecDec++)
                break
            spent = time.perf_counter() - t0
            if self.costs is not None:  # would even the best possible next depth pay for its own time?
                now = self._best(scores, k, spent)[1]
                bound = [s for _, s, _ in grow]  # (a child is never likelier than its parent)
                if self._best(scores + bound, k, spent + self.per_depth)[1] <= now:
                    break
            t1 = time.perf_counter()
            anc_rows = [path + [rows + j] for j, (_, _, path) in enumerate(grow)]
            rows += len(grow)
            anc = torch.zeros(len(grow), rows, dtype=torch.bool, device=dev)
            for j, r in enumerate(anc_rows):
                anc[j, r] = True
            ids = torch.tensor([tokens[node] for node, _, _ in grow], device=dev)
            parent_h = torch.stack([self._parent_h(node, frontier, parents) for node, _, _ in grow])
            pos = torch.full((len(grow),), last + depth, device=dev)
            h = head.step(parent_h, self.embed(ids), pos, self._tree_attend(tree_k, tree_v, anc))
            frontier = [(node, h[j], s, anc_rows[j]) for j, (node, s, _) in enumerate(grow)]
            self.per_depth = 0.9 * self.per_depth + 0.1 * (time.perf_counter() - t1 + spent / (depth + 1))
        keep = self._size(scores, k, time.perf_counter() - t0)
        remap = {0: 0} | {old + 1: new + 1 for new, old in enumerate(keep)}
        return Proposal([tokens[i] for i in keep], parents=[remap[parents[i]] for i in keep])

    @staticmethod
    def _parent_h(node: int, frontier: list, parents: list[int]) -> torch.Tensor:
        """The head output that predicted `node` (its parent's row; the root's for depth 1)."""
        want = parents[node] - 1  # the parent's node index (-1: the root)
        return next(f[1] for f in frontier if f[0] == want)

    def _best(self, scores: list[float], k: int, spent: float) -> tuple[int, float]:
        """(n, expected tokens per second) of verifying the n best nodes, n chosen to maximise it on
        the forward-cost curve, the drafting time already `spent` included."""
        top = sorted(scores, reverse=True)[: min(k, self.max_nodes)]
        gain = 1.0 + np.concatenate([[0.0], np.cumsum(top)])
        rate = [gain[n] / (self.costs(n + 1) + spent) for n in range(len(top) + 1)]
        n = int(np.argmax(rate))
        return n, rate[n]

    def _size(self, scores: list[float], k: int, spent: float) -> list[int]:
        """The nodes to verify, in tree order: the best n by score (`_best`; the first k best
        without a cost curve). Scores never rise from parent to child, so they form a tree."""
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: min(k, self.max_nodes)]
        if self.costs is not None and order:
            order = order[: self._best(scores, k, spent)[0]]
        return sorted(order)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] over keys/values [m, KVH, D] with mask [n, m] (True: attended): [n, H, D]."""
    h, kvh = q.shape[1], keys.shape[1]
    qh = q.transpose(0, 1)  # [H, n, D]
    kh = keys.transpose(0, 1).repeat_interleave(h // kvh, dim=0)
    vh = values.transpose(0, 1).repeat_interleave(h // kvh, dim=0)
    y = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], attn_mask=mask[None, None])
    return y[0].transpose(0, 1)
