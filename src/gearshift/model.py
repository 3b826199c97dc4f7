"""Llama-family transformer (Llama 2/3, SmolLM, Mistral, Qwen2) in plain PyTorch.

Written for decoding speed on small batches: q/k/v and gate/up are fused into one matmul each,
the KV cache is static, and every linear layer can keep its weights 4- or 8-bit packed (the CPU
kernels `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`), which is what makes a GGUF model
fast on a CPU: decoding streams every weight once per token, so fewer bytes means more tokens/s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache

FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
ROW_EXACT = 16  # forwards of at most this many tokens attend row by row (see Transformer.forward)
GROUP = 32  # int4 group size: the block size of GGUF's 4-bit formats, so Q4_0/Q4_1 map onto it


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # Llama's attention_bias also biases o_proj; Qwen2 biases only q/k/v
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + emb + self.dim


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization in groups of 32 along the input dim.

    On weights that came from GGUF Q4_1 this recovers the file's own 4-bit codes exactly
    (Q4_1 is min/max quantization on the same 32-element blocks). The kernel wants the scale and
    offset in bf16; rounding the offset naively shifts every weight of a block the same way, and
    on SmolLM2 that flips greedy tokens. So the scale is rounded first and the offset is then the
    least-squares fit for it, which keeps the block's mean exact (measured: greedy output equal
    to the float32 weights' on prompts where the naive offset diverged at the first token).
    """
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    exact = ((hi - lo) / 15).clamp(min=1e-10)
    q = ((g - lo[..., None]) / exact[..., None]).round().clamp(0, 15)
    scale = exact.to(torch.bfloat16).float()
    zero = (g - (q - 8) * scale[..., None]).mean(-1)  # the kernel computes (q - 8) * scale + zero
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(n, k), 1)
    return packed, torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 (gpt-fast's weight-only int8)."""
    scale = (w.float().abs().amax(-1) / 127).clamp(min=1e-10)
    q = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


class Linear(nn.Module):
    """y = x W^T (+ b), with W kept dense or packed to int8/int4 (CPU kernels, bf16 inputs)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        if fmt == "int4":
            self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(in_features // GROUP, out_features, 2, dtype=torch.bfloat16))
        elif fmt == "int8":
            self.register_buffer("packed", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=getattr(torch, fmt)))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    def set_weight(self, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
        if self.fmt == "int4":
            self.packed, self.scales = quantize_int4(w)
        elif self.fmt == "int8":
            self.packed, self.scales = quantize_int8(w)
        else:
            self.weight = w.to(self.weight.dtype, copy=True)  # never alias a tied embedding
        if b is not None:
            self.bias = b.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in_features] in the compute dtype (2-D: the packed kernels want it so)."""
        if self.fmt == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales)
        elif self.fmt == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.packed, self.scales)
        else:
            y = F.linear(x if x.dtype == self.weight.dtype else x.to(self.weight.dtype), self.weight)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, x.shape[-1:], w, self.eps)


class ExitHead(nn.Module):
    """A trained exit for an early-exit sub-model (SortedNet / Kangaroo): its own final norm
    after a low-rank correction of the intermediate hidden state, before the shared LM head.
    Zero-initialised, it starts as the plain early exit; it adds 2 * rank * dim + dim weights."""

    def __init__(self, dim: int, eps: float, rank: int):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.norm.weight = nn.Parameter(self.norm.weight)
        self.a = nn.Parameter(torch.randn(rank, dim) / dim ** 0.5)
        self.b = nn.Parameter(torch.zeros(dim, rank))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + F.linear(F.linear(h, self.a.to(h.dtype)), self.b.to(h.dtype)))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with the Llama 3 and linear scaling schemes transformers implements."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "freq_factors":  # GGUF stores Llama 3 scaling as per-frequency divisors
        inv = inv / torch.tensor(sc["factors"], dtype=torch.float32)
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from rotate-half to interleaved pairs (the llama.cpp layout).

    Attention scores only see q.k, so permuting the head dim of both alike changes nothing,
    and interleaved pairs let RoPE be one complex multiply over q and k together.
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: [B, S, heads, D] with interleaved pairs; rot: [B, S, 1, D/2] complex."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    y = torch.view_as_real(xc * rot).flatten(-2)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, fmt: str):
        super().__init__()
        self.cfg = cfg
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.qkv = Linear(cfg.dim, q + 2 * kv, fmt, bias=cfg.qkv_bias)
        self.o = Linear(q, cfg.dim, fmt, bias=cfg.o_bias)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_up = Linear(cfg.dim, 2 * cfg.hidden_dim, fmt, bias=cfg.mlp_bias)
        self.down = Linear(cfg.hidden_dim, cfg.dim, fmt, bias=cfg.mlp_bias)

    def forward(self, x, b: int, s: int, layer: int, cache: KVCache, start: int, rot, mask, paths):
        """x: [b * s, dim]: activations stay 2-D between blocks, as the linear kernels take them."""
        cfg = self.cfg
        qk, v = self.qkv(self.attn_norm(x)).split(
            [(cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim], dim=-1)
        qk = apply_rope(qk.view(b, s, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim), rot).transpose(1, 2)
        q, k = qk[:, :cfg.n_heads], qk[:, cfg.n_heads:]
        v = v.view(b, s, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        end = start + s
        gqa = cfg.n_heads != cfg.n_kv_heads
        if cache is None:  # training: whole sequences, nothing cached (autograd and in-place writes don't mix)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return self._rest(x, y, b, s)
        keys, values = cache.k[layer], cache.v[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        if mask is None:  # row-exact: each row exactly as a one-token decode step computes it
            rows, laid = [], list(range(s))  # laid: which node's entries sit at start, start + 1, ...
            for i in range(s):
                n = start + i + 1
                if paths is not None:  # lay the row's ancestors out after the prefix, as plain decoding has them
                    path = paths[i]
                    d = next((j for j, (a, node) in enumerate(zip(laid, path)) if a != node), len(path))
                    if d < len(path):
                        idx = torch.tensor(path[d:], device=x.device)
                        keys[:, :, start + d:start + len(path)] = k[:, :, idx]
                        values[:, :, start + d:start + len(path)] = v[:, :, idx]
                        laid[d:len(path)] = path[d:]
                    n = start + len(path)
                rows.append(F.scaled_dot_product_attention(q[:, :, i:i + 1], keys[:, :, :n], values[:, :, :n],
                                                           enable_gqa=gqa))
            if laid != list(range(s)):  # leave the entries in node order for the caller to compact
                keys[:, :, start:end] = k
                values[:, :, start:end] = v
            y = rows[0] if s == 1 else torch.cat(rows, dim=2)
        else:
            y = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask, enable_gqa=gqa)
        return self._rest(x, y, b, s)

    def _rest(self, x, y, b: int, s: int):
        """Attention output projection and the MLP, both residual."""
        x = x + self.o(y.transpose(1, 2).reshape(b * s, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, fmt: str | dict[str, str], dtype: torch.dtype = torch.float32):
        """`fmt` is one weight format for every linear, or {"layers": ..., "lm_head": ...}."""
        super().__init__()
        fmts = fmt if isinstance(fmt, dict) else {"layers": fmt, "lm_head": fmt}
        self.cfg, self.fmts, self.dtype = cfg, fmts, dtype
        self.register_buffer("embed", torch.empty(cfg.vocab_size, cfg.dim, dtype=dtype))
        self.layers = nn.ModuleList(Block(cfg, fmts["layers"]) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, fmts["lm_head"])
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def new_cache(self, batch: int = 1, max_len: int | None = None, n_layers: int | None = None) -> KVCache:
        c = self.cfg
        return KVCache(n_layers or c.n_layers, batch, c.n_kv_heads, max_len or c.max_seq_len, c.head_dim,
                       self.dtype, self.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None, last_only: bool = False,
                n_layers: int | None = None, parents: list[int] | None = None, hidden: bool = False) -> torch.Tensor:
        """Run `tokens` [B, S] after the cache's `length` positions; return logits (float32).

        Up to ROW_EXACT unpadded tokens are attended row by row, so scoring k tokens in one pass
        gives bitwise the logits of k one-token steps (the packed kernels are row-independent too):
        that is what makes greedy speculative decoding token-identical to plain decoding.

        `parents` makes the tokens a tree (one row, nodes in topological order, parents[0] = -1):
        node i sits at position length + depth(i) and sees the prefix and its own ancestors,
        laid out just as plain decoding would have them, so trees are exact as well. The cache
        then holds the nodes in node order; `KVCache.keep` compacts the accepted path.

        `n_layers` stops after that many blocks (the early-exit sub-model the speculative drafters
        use): the final norm and LM head are shared, so the sub-model costs no extra weights.
        `hidden` returns the last block's output [B, S, dim] instead (training picks its rows).
        Without a cache the forward is a training one: whole unpadded sequences, causal attention.
        """
        b, s = tokens.shape
        dev = tokens.device
        start = cache.length if cache is not None else 0
        end = start + s
        paths, mask = tree_paths(parents) if parents is not None else None, None
        pos = torch.arange(start, end, device=dev) if paths is None else \
            torch.tensor([start + len(p) - 1 for p in paths], device=dev)  # a tree node's position: its depth
        pos = pos[None, :].expand(b, s)  # [B, S]
        if cache is None:
            if parents is not None or last_only:
                raise ValueError("a forward without a cache runs whole sequences (training)")
        else:
            if end > cache.max_len:
                raise ValueError(f"sequence of {end} tokens exceeds the cache ({cache.max_len})")
            pos = (pos - cache.pad[:, None]).clamp(min=0)
            if parents is None and (s > ROW_EXACT or bool(cache.pad.any())):
                keys = torch.arange(end, device=dev)[None, None, :]
                query = torch.arange(start, end, device=dev)[None, :, None]
                # causal, not into the row's left padding; a padding query sees itself so no row is empty
                mask = ((keys <= query) & (keys >= cache.pad[:, None, None])) | (keys == query)
                mask = mask[:, None]  # [B, 1, S, end]
            elif parents is not None and (b != 1 or bool(cache.pad.any())):
                raise ValueError("a token tree needs one unpadded row")
        freqs = pos[..., None].float() * self.inv_freq  # [B, S, D/2]
        rot = torch.polar(torch.ones_like(freqs), freqs)[:, :, None]
        x = F.embedding(tokens.reshape(-1), self.embed)
        for i, layer in enumerate(self.layers[:n_layers]):
            x = layer(x, b, s, i, cache, start, rot, mask, paths)
        if cache is not None:
            cache.length = end
        x = x.view(b, s, -1)
        if hidden:
            return x
        if last_only:
            x = x[:, -1:]
            s = 1
        return self.lm_head(self.norm(x.reshape(b * s, -1))).view(b, s, -1).float()


def tree_paths(parents: list[int]) -> list[list[int]]:
    """Root-to-node index paths of a tree given as parent indices in topological order."""
    paths: list[list[int]] = []
    for i, par in enumerate(parents):
        if (i == 0) != (par == -1) or par >= i:
            raise ValueError("tree nodes must come in topological order with one root first")
        paths.append([0] if i == 0 else paths[par] + [i])
    return paths
