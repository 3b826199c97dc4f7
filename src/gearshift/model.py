"""Llama-family transformer (Llama 2/3, SmolLM2/3, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3) in plain PyTorch.

Written for decoding speed on small batches: q/k/v and gate/up are fused into one matmul each,
the KV cache is static, and every linear layer can keep its weights 4- or 8-bit packed (native
kernels in `csrc/linear.cpp`, PyTorch's packed CPU kernels where those are not built), which is
what makes a GGUF model fast on a CPU: decoding streams every weight once per token, so fewer
bytes means more tokens/s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import attention, kernels
from .attention import Batch, Segment
from .kv_cache import KVCache

FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
GROUP = 32  # int4 group size: the block size of GGUF's 4-bit formats, so Q4_0/Q4_1 map onto it
Q8_0_BLOCK = 32  # values per scale in GGUF's Q8_0 (an input embedding table kept in it: `Transformer`)


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
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3)
    # Gemma 3: norms of the attention and MLP outputs before each residual add, GeGLU, embeddings
    # scaled by sqrt(dim), its own softmax scale, and sliding-window layers with their own RoPE base
    post_norms: bool = False
    act: str = "silu"  # or "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    sliding_window: int | None = None  # keys a sliding layer's row sees: itself and the window - 1 before it
    layer_types: list[str] | None = None  # per layer "sliding_attention" or "full_attention" (None: all full)
    rope_local_theta: float | None = None  # the sliding layers' RoPE base (None: rope_theta)
    no_rope: list[int] | None = None  # layers that take no RoPE at all (SmolLM3's NoPE layers)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def window(self, layer: int) -> int | None:
        """The layer's attention window (None: every earlier position)."""
        sliding = self.layer_types is not None and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @property
    def windows(self) -> list[int | None]:
        return [self.window(i) for i in range(self.n_layers)]

    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        norms = (4 if self.post_norms else 2) * self.dim + (2 * self.head_dim if self.qk_norm else 0)
        return self.n_layers * (attn + mlp + norms) + emb + self.dim


Q4_COLS, Q8_COLS = 16, 8  # output columns per tile of the native kernels (csrc/linear.cpp); N is padded to whole tiles


def _pad_rows(w: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -w.shape[0] % multiple
    return torch.cat([w, w.new_zeros(extra, w.shape[1])]) if extra else w


def quantize_int4(w: torch.Tensor) -> torch.Tensor:
    """Asymmetric min/max quantization in blocks of 32 inputs (GGUF's Q4_1: fp16 scale d and min
    m per block, w = q * d + m), laid out for the native kernel in tiles of 16 output columns:
    uint8 [N/16, K/32, 320], per (tile, block) the 16 columns' d, their m, then 8 chunks of 32
    bytes, chunk c byte 2j + p holding input 4c + p of column j (low nibble) and input 4c + 2 + p
    (high nibble); see csrc/linear.cpp.

    On weights that came from a Q4_1 file this recovers the file's blocks (Q4_1 is min/max
    quantization on the same blocks, with fp16 d and m). The scale is rounded to fp16 first and the
    min is then the least-squares fit for it, which keeps each block's mean exact.
    """
    w = _pad_rows(w.float(), Q4_COLS)
    n, k = w.shape
    nb, t = k // GROUP, n // Q4_COLS
    g = w.reshape(n, nb, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / 15).to(torch.float16)
    df = d.float()
    q = ((g - lo[..., None]) / torch.where(df > 0, df, 1.0)[..., None]).round().clamp(0, 15)
    m = (g - q * df[..., None]).mean(-1).to(torch.float16)
    per_tile = lambda v: v.reshape(t, Q4_COLS, nb).transpose(1, 2).contiguous().view(torch.uint8)  # noqa: E731
    # [t, j, nb, k = 4c + 2h + p] -> [t, nb, c, h, j, p]
    q = q.to(torch.uint8).reshape(t, Q4_COLS, nb, 8, 2, 2).permute(0, 2, 3, 4, 1, 5)
    codes = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(t, nb, 8 * GROUP)
    return torch.cat([per_tile(d), per_tile(m), codes], -1).contiguous()


def unpack_int4(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_int4`'s tiles back to codes [N, K] (uint8, 0..15), scales and mins [N, K/32] (float32)."""
    t, nb, _ = tiles.shape
    col = lambda b: b.contiguous().view(torch.float16).float().transpose(1, 2).reshape(t * Q4_COLS, nb)  # noqa: E731
    codes = tiles[..., 4 * Q4_COLS :].reshape(t, nb, 8, Q4_COLS, 2)  # [t, nb, c, j, p]
    q = torch.stack([codes & 15, codes >> 4], 3)  # [t, nb, c, h, j, p]
    q = q.permute(0, 4, 1, 2, 3, 5).reshape(t * Q4_COLS, nb * GROUP)
    return q, col(tiles[..., : 2 * Q4_COLS]), col(tiles[..., 2 * Q4_COLS : 4 * Q4_COLS])


def dequantize_int4(tiles: torch.Tensor) -> torch.Tensor:
    q, d, m = unpack_int4(tiles)
    n = q.shape[0]
    return (q.float().reshape(n, -1, GROUP) * d[..., None] + m[..., None]).reshape(n, -1)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 (gpt-fast's weight-only int8), in tiles of 8 output
    columns for the native kernel: int8 [N/8, K, 8] holding, per pair of inputs (2c, 2c + 1), the
    16 bytes w[2c][j], w[2c+1][j] of columns j = 0..7 (the pairs the kernel multiplies), and float32
    scales [N] (N padded to 8)."""
    w = _pad_rows(w.float(), Q8_COLS)
    n, k = w.shape
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-10)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    if k % 2:
        raise ValueError(f"int8 weights need an even number of inputs, got {k}")
    # [t, j, c, p] -> [t, c, j, p]
    return q.reshape(n // Q8_COLS, Q8_COLS, k // 2, 2).transpose(1, 2).reshape(n // Q8_COLS, k, Q8_COLS), scale


def unpack_int8(tiles: torch.Tensor) -> torch.Tensor:
    """`quantize_int8`'s tiles back to codes [N, K] (int8)."""
    t, k, _ = tiles.shape
    return tiles.reshape(t, k // 2, Q8_COLS, 2).transpose(1, 2).reshape(t * Q8_COLS, k)


class Linear(nn.Module):
    """y = x W^T (+ b), with W kept dense or packed to int8/int4.

    Packed weights run on the native kernels (`kernels.linear()`, `csrc/linear.cpp`: activations
    quantized to int16 per block of 32 inputs, integer products with the int4 or int8 weights; each
    weight block unpacked once for up to four rows) or, where those are not built, on PyTorch's packed CPU
    kernels (bf16 activations), converted on first use. Both compute every row on its own, so a
    row's result never depends on the other rows of the call.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        if fmt == "int4":
            tiles = -(-out_features // Q4_COLS)
            self.register_buffer("tiles", torch.empty(tiles, in_features // GROUP, 20 * Q4_COLS, dtype=torch.uint8))
        elif fmt == "int8":
            tiles = -(-out_features // Q8_COLS)
            self.register_buffer("tiles", torch.empty(tiles, in_features, Q8_COLS, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(tiles * Q8_COLS, dtype=torch.float32))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=getattr(torch, fmt)))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        self._torch_packed: tuple[torch.Tensor, torch.Tensor] | None = None  # PyTorch's layout, when used

    def set_weight(self, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
        if self.fmt == "int4":
            self.tiles = quantize_int4(w)
        elif self.fmt == "int8":
            self.tiles, self.scales = quantize_int8(w)
        else:
            self.weight = w.to(self.weight.dtype, copy=True)  # never alias a tied embedding
        if b is not None:
            self.bias = b.float()
        self._torch_packed = None

    def _torch_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights in the layout of PyTorch's packed kernels (the fallback), built once."""
        if self._torch_packed is None:
            if self.fmt == "int4":  # N stays padded to whole tiles of 16, as PyTorch's kernel wants
                q, d, m = unpack_int4(self.tiles)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
                # PyTorch's kernel computes (q - 8) * scale + zero
                scales = torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
                self._torch_packed = packed, scales
            else:
                self._torch_packed = unpack_int8(self.tiles).contiguous(), self.scales.to(torch.bfloat16)
        return self._torch_packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in_features] in the compute dtype (2-D: the packed kernels want it so)."""
        if self.fmt in ("int4", "int8"):
            if kernels.paths(x.device.type, torch.float32).linear and self.in_features % GROUP == 0:
                xf = x.float().contiguous()
                y = (
                    torch.ops.gearshift.linear_q4(xf, self.tiles)
                    if self.fmt == "int4"
                    else torch.ops.gearshift.linear_q8(xf, self.tiles, self.scales)
                )
            else:
                w, s = self._torch_layout()
                y = (
                    torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, GROUP, s)
                    if self.fmt == "int4"
                    else torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w, s)
                )
            if y.shape[1] != self.out_features:  # padded to whole tiles
                y = y[:, : self.out_features]
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
        self.a = nn.Parameter(torch.randn(rank, dim) / dim**0.5)
        self.b = nn.Parameter(torch.zeros(dim, rank))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + F.linear(F.linear(h, self.a.to(h.dtype)), self.b.to(h.dtype)))


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies, with the Llama 3, linear and LongRoPE (short) schemes transformers implements;
    `local`: those of the sliding-window layers (Gemma 3: their own base, never scaled)."""
    dim = cfg.head_dim
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = {} if local else cfg.rope_scaling or {}
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
    elif kind == "longrope":  # Phi-3 within its pretraining length: the short factors (`loading._longrope`)
        short = torch.tensor(sc["short_factor"], dtype=torch.float32)
        inv = 1.0 / (short * theta ** (torch.arange(0, dim, 2).float() / dim))
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
        if cfg.qk_norm:  # weights in the interleaved-pair order of q/k's rows (`interleave_rope_rows`)
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)
        if cfg.post_norms:
            self.post_attn_norm, self.post_mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        # the kernels' softmax scale is 1/sqrt(D); another scale (Gemma's query_pre_attn_scalar) goes into q
        self.q_scale = None if cfg.attn_scale is None else cfg.attn_scale * math.sqrt(cfg.head_dim)
        if self.q_scale == 1.0:
            self.q_scale = None
        self._fused_weights: tuple | None = None

    def fused_weights(self) -> tuple:
        """This block's weights as `gearshift::block` takes them, gathered on first use (packed
        weights are not trained, so they do not change after loading)."""
        if self._fused_weights is None:
            f = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
            self._fused_weights = (
                f(self.attn_norm.weight),
                self.qkv.tiles,
                f(self.qkv.bias),
                self.o.tiles,
                f(self.o.bias),
                f(self.mlp_norm.weight),
                self.gate_up.tiles,
                f(self.gate_up.bias),
                self.down.tiles,
                f(self.down.bias),
            )
            cfg, norm = self.cfg, lambda name: f(getattr(self, name).weight) if hasattr(self, name) else None  # noqa: E731
            scales = lambda lin: lin.scales if lin.fmt == "int8" else None  # noqa: E731
            self._fused_extras = (
                norm("q_norm"),
                norm("k_norm"),
                norm("post_attn_norm"),
                norm("post_mlp_norm"),
                *(scales(lin) for lin in (self.qkv, self.o, self.gate_up, self.down)),
                self.q_scale or 1.0,
                cfg.act == "gelu_tanh",
            )
        return self._fused_weights

    def fused_extras(self) -> tuple:
        """The fused block's optional arguments: QK-norm, post norms, int8 scales, q scale, GeGLU."""
        self.fused_weights()
        return self._fused_extras

    def forward(self, x: torch.Tensor, rot: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x: [tokens, dim]: activations stay 2-D between blocks, as the linear kernels take them.
        `attend(q, k, v)` ([tokens, heads, D] each) is the attention: cached or causal (`attention`)."""
        cfg, t = self.cfg, x.shape[0]
        qk, v = self.qkv(self.attn_norm(x)).split(
            [(cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim], dim=-1
        )
        qk = qk.view(t, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, : cfg.n_heads]), self.k_norm(qk[:, cfg.n_heads :])], dim=1)
        qk = apply_rope(qk, rot)
        q = qk[:, : cfg.n_heads] if self.q_scale is None else qk[:, : cfg.n_heads] * self.q_scale
        y = self.o(attend(q, qk[:, cfg.n_heads :], v.view(t, cfg.n_kv_heads, cfg.head_dim)).reshape(t, -1))
        x = x + (self.post_attn_norm(y) if cfg.post_norms else y)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        act = F.silu(gate) if cfg.act == "silu" else F.gelu(gate, approximate="tanh")
        y = self.down(act * up)
        return x + (self.post_mlp_norm(y) if cfg.post_norms else y)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, fmt: str | dict[str, str], dtype: torch.dtype = torch.float32):
        """`fmt` is one weight format for every linear, or {"layers": ..., "lm_head": ...[, "embed": "q8_0"]}.

        The input embedding table is `embed` [vocab, dim] in the compute dtype, or, where a file's
        table is Q8_0 (`loading.q8_0_blocks` checks that its values are exactly that), those blocks:
        int8 codes `embed_q` and a float32 scale per 32 values `embed_d`. Rows are then made on
        lookup (`embed_rows`), the same float32 products the file's dequantization gives, at a
        quarter of the memory (Gemma-3-270M's 262k-row table: 671 MB as float32)."""
        super().__init__()
        fmts = fmt if isinstance(fmt, dict) else {"layers": fmt, "lm_head": fmt}
        self.cfg, self.fmts, self.dtype = cfg, fmts, dtype
        if fmts.get("embed") == "q8_0":
            self.embed = None
            self.register_buffer("embed_q", torch.empty(cfg.vocab_size, cfg.dim, dtype=torch.int8))
            self.register_buffer("embed_d", torch.empty(cfg.vocab_size, cfg.dim // Q8_0_BLOCK, dtype=torch.float32))
        else:
            self.register_buffer("embed", torch.empty(cfg.vocab_size, cfg.dim, dtype=dtype))
        self.layers = nn.ModuleList(Block(cfg, fmts["layers"]) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, fmts["lm_head"])
        with torch.device("cpu"):  # real numbers even when built on "meta" (which would also import torch._refs)
            inv_freq, local = rope_inv_freq(cfg), rope_inv_freq(cfg, local=True)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("inv_freq_local", local, persistent=False)  # sliding layers' (Gemma 3)
        self.windows = cfg.windows
        # the fused block takes int4 or int8 layers, float32 activations, and outputs of whole 16-column tiles
        whole_tiles = all(
            n % Q4_COLS == 0 for n in (cfg.dim, 2 * cfg.hidden_dim, cfg.head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads))
        )
        packed = fmts["layers"] in ("int4", "int8") and all(
            k % GROUP == 0 for k in (cfg.dim, cfg.hidden_dim, cfg.n_heads * cfg.head_dim)
        )
        self._fusable = packed and dtype == torch.float32 and whole_tiles and cfg.act in ("silu", "gelu_tanh")

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def init_rope(self) -> None:
        """Compute RoPE's frequencies (buffers not saved with the weights: a model built on "meta"
        and then loaded needs them again)."""
        self.inv_freq = rope_inv_freq(self.cfg).to(self.device)
        self.inv_freq_local = rope_inv_freq(self.cfg, local=True).to(self.device)

    def new_cache(self, slots: int = 1, max_len: int | None = None, n_layers: int | None = None) -> KVCache:
        c = self.cfg
        cache = KVCache(
            n_layers or c.n_layers, slots, c.n_kv_heads, max_len or c.max_seq_len, c.head_dim, self.dtype, self.device
        )
        cache.inv_freq = self.inv_freq.to(self.device)
        cache.windows = self.windows[: cache.k.shape[0]]
        return cache

    def _rotation(self, positions: torch.Tensor, local: bool = False) -> torch.Tensor:
        freqs = positions[:, None].float() * (self.inv_freq_local if local else self.inv_freq)  # [tokens, D/2]
        # LongRoPE scales cos and sin by its attention factor (so q.k by its square); else 1
        scale = 1.0 if local else (self.cfg.rope_scaling or {}).get("attention_factor", 1.0)
        return torch.polar(torch.full_like(freqs, scale), freqs)[:, None]

    def _rotations(self, positions: torch.Tensor, n_layers: int | None) -> list[torch.Tensor]:
        """Each layer's RoPE rotation, one tensor per kind: sliding layers may have their own base,
        and a NoPE layer's is the identity (cos 1, sin 0: multiplying by it changes no bit)."""
        rot = self._rotation(positions)
        rots = [rot] * len(self.layers[:n_layers])
        if self.cfg.rope_local_theta is not None and any(self.windows):
            local = self._rotation(positions, local=True)
            rots = [r if w is None else local for r, w in zip(rots, self.windows)]
        if self.cfg.no_rope:
            identity = torch.ones_like(rot)
            rots = [identity if i in self.cfg.no_rope else r for i, r in enumerate(rots)]
        return rots

    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of the input embedding table (before Gemma's scale), in the compute dtype."""
        if self.embed is not None:
            return F.embedding(tokens, self.embed)
        d = self.embed_d[tokens].repeat_interleave(Q8_0_BLOCK, dim=-1)
        return (self.embed_q[tokens].float() * d).to(self.dtype)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_rows(tokens)
        return x if self.cfg.embed_scale == 1.0 else x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)

    def forward(self, batch: Batch, cache: KVCache, n_layers: int | None = None, hidden: bool = False) -> torch.Tensor:
        """Run a batch of segments, each appended to its cache slot; return the logits (float32) of
        the rows the segments ask for, in segment order ([rows, vocab]).

        Every row is computed exactly as a one-token step would compute it (`attention.cached`),
        so how rows are grouped into forwards never changes a result.
        `n_layers` stops after that many blocks (the early-exit sub-model the speculative drafters
        use: the final norm and LM head are shared, so it costs no extra weights); `hidden`
        returns the last block's output for those rows instead.
        """
        x = self.embed_tokens(batch.tokens)
        rots = self._rotations(batch.positions, n_layers)
        if self._fused(batch):
            cos_sin = {id(r): torch.view_as_real(r).reshape(len(x), -1).contiguous() for r in rots}
            heads, eps = (self.cfg.n_heads, self.cfg.n_kv_heads), self.cfg.norm_eps
            for i, layer in enumerate(self.layers[:n_layers]):
                holes = batch.holes[i] if batch.holes is not None else attention.NO_HOLES
                quant = cache.quantized_layer(i) if batch.quantized else attention.NO_QUANT
                x = torch.ops.gearshift.block(
                    x,
                    *layer.fused_weights(),
                    cos_sin[id(rots[i])],
                    cache.k[i],
                    cache.v[i],
                    *batch.native_io(cache.windows[i]),
                    holes,
                    *quant,
                    *heads,
                    eps,
                    *layer.fused_extras(),
                )
        else:
            for i, layer in enumerate(self.layers[:n_layers]):
                x = layer(x, rots[i], partial(attention.cached, cache=cache, layer=i, batch=batch))
        if batch.feature_index is not None:  # (segments that asked: a draft head reads them)
            batch.features = x[batch.feature_index]
        if batch.out is not None:
            if not len(batch.out):  # nothing asked for (a prefill chunk): skip the LM head
                return x[:0] if hidden else x.new_empty(0, self.cfg.vocab_size, dtype=torch.float32)
            x = x[batch.out]
        return x if hidden else self.logits(x)

    def _fused(self, batch: Batch) -> bool:
        """Whether blocks run as one native op each (`csrc/block.cpp`): int4 or int8 layers, float32
        activations and cache on a CPU with the native kernels. The same math as `Block.forward`,
        computed row by row like the rest, without a few hundred small ops' dispatch per step. A step
        that keeps queries for a KV policy (`Segment.capture_from`) runs the unfused path, which has them."""
        return batch.native is not None and self._fusable and batch.paths.block and not batch.capture

    def run(
        self,
        tokens: list[int] | torch.Tensor,
        cache: KVCache,
        slot: int = 0,
        parents: list[int] | None = None,
        logits_from: int | None = 0,
        n_layers: int | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """One segment: `tokens` appended to `slot` (whose length then counts them); the logits of rows
        from `logits_from` on."""
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        cache.slide(slot)
        batch = Batch([Segment(slot, tokens, parents, logits_from)], cache)
        out = self(batch, cache, n_layers=n_layers, hidden=hidden)
        batch.advance(cache)
        return out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden states [rows, dim] to float32 logits."""
        return self.lm_head(self.norm(h)).float()

    def forward_train(self, tokens: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """Training: whole unpadded sequences [B, S], causal attention, nothing cached; returns the
        last block's output [B, S, dim] (training picks the rows it needs and applies `logits`)."""
        b, s = tokens.shape
        x = self.embed_tokens(tokens.reshape(-1))
        rots = self._rotations(torch.arange(s, device=tokens.device).repeat(b), n_layers)
        for i, layer in enumerate(self.layers[:n_layers]):
            x = layer(x, rots[i], partial(attention.causal, b=b, s=s, window=self.windows[i]))
        return x.view(b, s, -1)
