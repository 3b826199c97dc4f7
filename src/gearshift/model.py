"""Llama-family transformer (Llama 2/3, SmolLM, Mistral, Qwen2) in plain PyTorch.

Written for decoding speed on small batches: q/k/v and gate/up are fused into one matmul each,
the KV cache is static, and every linear layer can keep its weights 4- or 8-bit packed (the CPU
kernels `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`), which is what makes a GGUF model
fast on a CPU: decoding streams every weight once per token, so fewer bytes means more tokens/s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import attention
from .attention import Batch, Segment
from .kv_cache import KVCache

FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
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
    """x: [tokens, heads, D] with interleaved pairs; rot: [tokens, 1, D/2] complex."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    y = torch.view_as_real(xc * rot).flatten(-2)
    return y if y.dtype == x.dtype else y.to(x.dtype)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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

    def forward(self, x: torch.Tensor, rot: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x: [tokens, dim]: activations stay 2-D between blocks, as the linear kernels take them.
        `attend(q, k, v)` ([tokens, heads, D] each) is the attention: cached or causal (`attention`)."""
        cfg, t = self.cfg, x.shape[0]
        qk, v = self.qkv(self.attn_norm(x)).split(
            [(cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim], dim=-1)
        qk = apply_rope(qk.view(t, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim), rot)
        y = attend(qk[:, :cfg.n_heads], qk[:, cfg.n_heads:], v.view(t, cfg.n_kv_heads, cfg.head_dim))
        x = x + self.o(y.reshape(t, -1))
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

    def new_cache(self, slots: int = 1, max_len: int | None = None, n_layers: int | None = None) -> KVCache:
        c = self.cfg
        return KVCache(n_layers or c.n_layers, slots, c.n_kv_heads, max_len or c.max_seq_len, c.head_dim,
                       self.dtype, self.device)

    def _rotation(self, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions[:, None].float() * self.inv_freq  # [tokens, D/2]
        return torch.polar(torch.ones_like(freqs), freqs)[:, None]

    def forward(self, batch: Batch, cache: KVCache, n_layers: int | None = None, hidden: bool = False) -> torch.Tensor:
        """Run a batch of segments, each appended to its cache slot; return the logits (float32) of
        the rows the segments ask for, in segment order ([rows, vocab]).

        Every row is computed exactly as a one-token step would compute it (`attention.cached`),
        so how rows are grouped into forwards never changes a result.
        `n_layers` stops after that many blocks (the early-exit sub-model the speculative drafters
        use: the final norm and LM head are shared, so it costs no extra weights); `hidden`
        returns the last block's output for those rows instead.
        """
        x = F.embedding(batch.tokens, self.embed)
        rot = self._rotation(batch.positions)
        for i, layer in enumerate(self.layers[:n_layers]):
            x = layer(x, rot, partial(attention.cached, cache=cache, layer=i, batch=batch))
        batch.advance(cache)
        if batch.out is not None:
            if not len(batch.out):  # nothing asked for (a prefill chunk): skip the LM head
                return x[:0] if hidden else x.new_empty(0, self.cfg.vocab_size, dtype=torch.float32)
            x = x[batch.out]
        return x if hidden else self.logits(x)

    def run(self, tokens: list[int] | torch.Tensor, cache: KVCache, slot: int = 0, parents: list[int] | None = None,
            logits_from: int | None = 0, n_layers: int | None = None, hidden: bool = False) -> torch.Tensor:
        """One segment: `tokens` appended to `slot`; the logits of rows from `logits_from` on."""
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        seg = Segment(slot, tokens, parents, logits_from)
        return self(Batch([seg], cache), cache, n_layers=n_layers, hidden=hidden)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden states [rows, dim] to float32 logits."""
        return self.lm_head(self.norm(h)).float()

    def forward_train(self, tokens: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """Training: whole unpadded sequences [B, S], causal attention, nothing cached; returns the
        last block's output [B, S, dim] (training picks the rows it needs and applies `logits`)."""
        b, s = tokens.shape
        x = F.embedding(tokens.reshape(-1), self.embed)
        rot = self._rotation(torch.arange(s, device=tokens.device).repeat(b))
        for layer in self.layers[:n_layers]:
            x = layer(x, rot, partial(attention.causal, b=b, s=s))
        return x.view(b, s, -1)
