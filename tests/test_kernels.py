"""The native kernels (csrc/): quantized matrix products, the fused block and their layouts, checked
against plain PyTorch math on the same numbers. Row independence is what keeps batched decoding
exact, so it is checked bit for bit."""

import pytest
import torch

from gearshift import kernels
from gearshift.attention import Batch, Segment
from gearshift.model import Linear, dequantize_int4, quantize_int4, quantize_int8, unpack_int4, unpack_int8

pytestmark = pytest.mark.skipif(not kernels.linear(), reason="native kernels need AVX2/FMA/F16C and a compiler")


def q41_weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights that are exactly Q4_1 blocks (fp16 d and m, codes 0..15 with 0 and 15 in every block)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(n, k // 32, generator=g) * 0.1).half().float()
    return (q * d[..., None] + m[..., None]).reshape(n, k), q.reshape(n, k), d, m


def test_int4_layout_recovers_q41_blocks():
    w, q, d, m = q41_weights(24, 96)
    tiles = quantize_int4(w)
    assert tiles.shape == (2, 3, 320) and tiles.dtype == torch.uint8
    q2, d2, m2 = (t[:24] for t in unpack_int4(tiles))  # padded to whole tiles of 16 columns
    assert torch.equal(q2.long(), q) and torch.equal(d2, d) and torch.equal(m2, m)
    assert torch.equal(dequantize_int4(tiles)[:24], w)
    assert not dequantize_int4(tiles)[24:].any()


def int8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as `linear_q4` quantizes it, in float64, and which blocks got residual codes: int8
    per block of 32 (scale max|x| / 127), and where a block's largest value is more than 4x its RMS,
    its residual x - dx q as int8 on a 254x finer scale."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    dx, inv = amax / 127, torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)
    fine = amax * amax * 32 > 16 * (xb * xb).sum(-1, keepdim=True)
    left = (xb.double() - q.double() * dx.double()).float()  # one rounding, as the kernel's fnmadd
    r = torch.clamp(torch.round(left * (254 * inv)), -127, 127)
    value = torch.where(fine, (254 * q.double() + r.double()) * (dx / 254).double(), q.double() * dx.double())
    return value.view(m, k), fine.view(m, k // 32)


@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (40, 64)])
def test_products_match_float_math_and_rows_are_independent(n, k):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(13, k, generator=g) * (1 + 20 * (torch.rand(13, k, generator=g) < 0.02))  # a few outliers
    tiles = quantize_int4(w)
    y4 = torch.ops.gearshift.linear_q4(x, tiles)[:, :n]
    xq, fine = int8_activations(x)
    assert 0.1 < fine.float().mean() < 0.9  # both kinds of block
    ref4 = xq @ dequantize_int4(tiles)[:n].double().T
    # the same integers; only the float steps (per block, in float32) round
    assert (y4.double() - ref4).norm() / ref4.norm() < 1e-5
    exact = x.double() @ dequantize_int4(tiles)[:n].double().T
    assert (y4.double() - exact).norm() / exact.norm() < 2e-2
    q8, s8 = quantize_int8(w)
    assert torch.equal(unpack_int8(q8)[:n], (w / s8[:n, None]).round().to(torch.int8))  # the layout's inverse
    y8 = torch.ops.gearshift.linear_q8(x, q8, s8)
    ref8 = x.double() @ (unpack_int8(q8).double() * s8.double()[:, None]).T
    # x is quantized to int16 per block of 32, as for int4: a relative error near 2^-15
    assert (y8.double() - ref8).norm() / ref8.norm() < 1e-4
    for op, args in ((torch.ops.gearshift.linear_q4, (tiles,)), (torch.ops.gearshift.linear_q8, (q8, s8))):
        full = op(x, *args)
        for rows in (slice(0, 1), slice(5, 6), slice(2, 9), slice(12, 13)):  # every tile shape: 1-3 rows, 4s
            assert torch.equal(op(x[rows].contiguous(), *args), full[rows])


def test_an_outlier_block_gets_the_resolution_of_int16():
    """A block whose scale an outlier sets gets its residual codes: its other values come out ~100x
    closer than int8 alone would leave them (a step of max|x| / 127)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 64, generator=g)
    x[:, 3] = 40.0  # block 0 has an outlier, block 1 none
    w = torch.zeros(32, 64)
    w[:16, :32] = torch.randn(16, 32, generator=g) * 0.05  # columns 0-15 read block 0, 16-31 block 1
    w[16:, 32:] = torch.randn(16, 32, generator=g) * 0.05
    tiles = quantize_int4(w)
    y = torch.ops.gearshift.linear_q4(x, tiles).double()
    wd = dequantize_int4(tiles).double()
    exact = x.double() @ wd.T
    err = lambda y, cols: ((y[:, cols] - exact[:, cols]).norm() / exact[:, cols].norm()).item()  # noqa: E731
    assert int8_activations(x)[1].tolist() == [[True, False]] * 4
    amax = x.view(4, 2, 32).abs().amax(-1, keepdim=True)
    int8_alone = (torch.round(x.view(4, 2, 32) * 127 / amax) * amax / 127).view(4, 64).double() @ wd.T
    assert err(y, slice(0, 16)) < err(int8_alone, slice(0, 16)) / 30
    assert err(y, slice(16, 32)) == pytest.approx(err(int8_alone, slice(16, 32)), rel=1e-3)  # int8 alone there


def test_linear_pads_columns_and_matches_pytorch_fallback(monkeypatch):
    """An output size that is not a multiple of 8 (tiles are padded); PyTorch's packed kernels (bf16
    activations) give nearly the same result from the same layout."""
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(50, 64, generator=g) * 0.05, torch.randn(3, 64, generator=g)
    for fmt in ("int4", "int8"):
        lin = Linear(64, 50, fmt)
        lin.set_weight(w)
        native = lin(x)
        assert native.shape == (3, 50)
        monkeypatch.setitem(kernels._state, "loaded", False)
        fallback = lin(x)
        monkeypatch.undo()
        assert torch.allclose(native, fallback, atol=2e-2, rtol=2e-2), (native - fallback).abs().max()


def test_fused_block_matches_the_pytorch_block(llm, monkeypatch):
    """The default model's forward with fused blocks against the same weights through `Block.forward`
    (the PyTorch ops, native attention): the same math, rounded differently, so close not equal.
    How close is set by the int8 activations of the int4 layers: a last-bit difference upstream can
    move a value across a rounding boundary, one step of max|x| / 127, and 30 layers carry that on
    (measured: keys 0.9% apart, logits 0.6%, KL 0.0017, 2 of 40 top-1 differ on random tokens)."""
    m = llm.model
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 49152, (40,), generator=g).tolist()
    with torch.inference_mode():
        batch = lambda c: Batch([Segment(0, tokens, logits_from=0)], c)  # noqa: E731
        c1 = m.new_cache(1, 64)
        assert m._fused(batch(c1))
        fused = m(batch(c1), c1)
        monkeypatch.setattr(type(m), "_fused", lambda self, b: False)
        c2 = m.new_cache(1, 64)
        plain = m(batch(c2), c2)
    assert c1.lengths == c2.lengths == [0]  # the forward writes entries; its caller moves lengths on
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(c1.k[:, 0, :40], c2.k[:, 0, :40]) < 0.03 and rel(fused, plain) < 0.02
    assert (fused.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.9
    lp, lq = torch.log_softmax(plain, -1), torch.log_softmax(fused, -1)
    assert (lp.exp() * (lp - lq)).sum(-1).mean() < 0.01


_PRODUCTS = """
import sys, torch
from gearshift import kernels
assert kernels.linear()
g = torch.Generator().manual_seed(3)
out = []
for n, k in ((960, 576), (576, 1536), (48, 64)):
    tiles, q8, s8 = torch.load(sys.argv[1])[f"{n}x{k}"]
    x = torch.randn(9, k, generator=g) * torch.rand(9, k, generator=g) ** 4 * 10
    out += [torch.ops.gearshift.linear_q4(x[:m].contiguous(), tiles) for m in (1, 2, 3, 4, 9)]
    out += [torch.ops.gearshift.linear_q8(x[:m].contiguous(), q8, s8) for m in (1, 2, 3, 4, 9)]
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif(kernels.vnni() is None, reason="this CPU has no VNNI")
def test_vnni_products_are_the_bits_of_madd_and_add(tmp_path):
    """The int4 and int8 kernels built with VNNI (fused multiply-add of int16 pairs) against the same
    source built without it: integer sums are exact, so every output must be the same bits."""
    import os
    import subprocess
    import sys

    g = torch.Generator().manual_seed(4)
    weights = {f"{n}x{k}": torch.randn(n, k, generator=g) * 0.05 for n, k in ((960, 576), (576, 1536), (48, 64))}
    tiles = {name: (quantize_int4(w), *quantize_int8(w)) for name, w in weights.items()}
    torch.save(tiles, tmp_path / "tiles.pt")
    (tmp_path / "products.py").write_text(_PRODUCTS)
    runs = {}
    for vnni in ("1", "0"):  # a second library, built without VNNI (once per machine, cached)
        env = {**os.environ, "GEARSHIFT_VNNI": vnni}
        out = tmp_path / f"out{vnni}.pt"
        subprocess.run(
            [sys.executable, str(tmp_path / "products.py"), str(tmp_path / "tiles.pt"), str(out)],
            env=env,
            check=True,
            timeout=600,
        )
        runs[vnni] = torch.load(out)
    assert len(runs["1"]) == 30
    assert all(torch.equal(a, b) for a, b in zip(runs["1"], runs["0"]))


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (6, 2, 32), (4, 1, 64)])
def test_grouped_heads_attend_as_each_head_alone(heads, kv_heads, d):
    """Query heads that share a KV head are computed together (each key loaded once); each one's
    result must be the bits it gets with a KV head of its own."""
    att = torch.ops.gearshift.attend
    g = torch.Generator().manual_seed(5)
    n = 70
    k, v = torch.randn(2, n + 4, kv_heads, d, generator=g), torch.randn(2, n + 4, kv_heads, d, generator=g)
    q = torch.randn(3, heads, d, generator=g) * 2
    rows = torch.tensor([[0, n, 0, 0], [1, n - 5, 0, 2], [0, 1, 1, 2]])
    extra = torch.tensor([n + 1, n + 3])
    holes = torch.empty(0, dtype=torch.int64)
    grouped = att(q, k, v, rows, extra, holes)
    g_ = heads // kv_heads
    alone = att(q, k.repeat_interleave(g_, 2), v.repeat_interleave(g_, 2), rows, extra, holes)
    assert torch.equal(grouped, alone)
