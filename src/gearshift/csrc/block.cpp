// One transformer block (Llama family) as one op: RMSNorm, q/k/v, RoPE, KV cache write, exact
// attention, output projection, RMSNorm, gate/up, SiLU, down, both residuals.
//
// Why: a decode step of a small model is hundreds of tiny tensor ops, and on a CPU each costs a
// few microseconds of dispatch whatever its size, which for SmolLM2-135M is as much as the
// arithmetic. One call per block removes that overhead and keeps the math of `model.Block`
// (same formats, same order of operations per row): like every kernel here it computes each row
// on its own, so a row's result never depends on the other rows of the step.
//
// Used for int4 or int8 blocks with float32 activations and caches on a CPU with AVX2 (model.Block
// falls back to its PyTorch ops elsewhere). The optional parts are those of Qwen3 and Gemma 3:
// RMSNorm of each query and key head, a query scale, norms of the attention and MLP outputs before
// their residual adds, and GeGLU (tanh GELU) in place of SwiGLU; a sliding-window layer's rows
// come with their first position (`attend_q`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "simd.h"

at::Tensor attend_q(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                    const at::Tensor& extra, const at::Tensor& holes, const at::Tensor& kq, const at::Tensor& vq,
                    const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& qfmt);
void quantize_into(const at::Tensor& k, const at::Tensor& v, const at::Tensor& write, const at::Tensor& kq,
                   const at::Tensor& vq, const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& qfmt);
at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& blocks);
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scale);

namespace {

// y = x / sqrt(mean(x^2) + eps) * w, per row (float, sequential sum: fixed order per row).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t T = x.size(0), n = x.size(1);
  auto y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = xp + t * n;
    float ss = 0.f;
    for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) yp[t * n + i] = xr[i] * r * wp[i];
  }
  return y;
}

void add_bias(at::Tensor& y, const std::optional<at::Tensor>& b) {
  if (b.has_value()) y.add_(*b);
}

// A packed linear layer: int4 tiles, or int8 tiles with their per-column scales.
at::Tensor packed(const at::Tensor& x, const at::Tensor& tiles, const std::optional<at::Tensor>& scales) {
  return scales.has_value() ? linear_q8(x, tiles, *scales) : linear_q4(x, tiles);
}

// `rms_norm` of each D-float head of one row, in place (the same math, row by row).
void norm_heads(float* p, int64_t heads, int64_t D, const float* w, float eps) {
  for (int64_t head = 0; head < heads; ++head, p += D) {
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) ss += p[i] * p[i];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) p[i] = p[i] * r * w[i];
  }
}

// gate [T, 2F] (gate then up per row) -> act(gate) * up [T, F]: SiLU, or GELU's tanh form (GeGLU)
at::Tensor gated(const at::Tensor& gu, bool gelu) {
  const int64_t T = gu.size(0), F = gu.size(1) / 2;
  auto act = at::empty({T, F}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  constexpr float c = 0.7978845608028654f, k3 = 0.044715f;  // sqrt(2 / pi)
  for (int64_t t = 0; t < T; ++t) {
    const float* g = gp + t * 2 * F;
    const float* u = g + F;
    float* a = ap + t * F;
    int64_t i = 0;
#ifdef GEARSHIFT_AVX2
    const __m256 one = _mm256_set1_ps(1.f), hi = _mm256_set1_ps(88.f);
    if (gelu) {
      const __m256 m2c = _mm256_set1_ps(-2.f * c), kv = _mm256_set1_ps(k3);
      for (; i + 8 <= F; i += 8) {  // 0.5 g (1 + tanh z) = g / (1 + exp(-2z)): no cancellation for g < 0
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 z2 = _mm256_mul_ps(m2c, _mm256_fmadd_ps(_mm256_mul_ps(kv, gv), _mm256_mul_ps(gv, gv), gv));
        const __m256 e = gearshift_simd::exp8(_mm256_min_ps(z2, hi));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
      }
    } else {
      for (; i + 8 <= F; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = gearshift_simd::exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), hi));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
      }
    }
#endif
    for (; i < F; ++i) {
      if (gelu) {
        const float z2 = -2.f * c * (g[i] + k3 * g[i] * g[i] * g[i]);
        a[i] = g[i] / (1.0f + std::exp(std::min(z2, 88.f))) * u[i];
      } else {
        a[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
      }
    }
  }
  return act;
}

}  // namespace

// x [T, dim]; rot [T, D]: (cos, sin) pairs per row; cache k/v [slots, L, KVH, D] of this layer;
// write [T] flat positions (slot * L + position); rows/extra/holes and the quantized copies
// (kq, vq, ks, vs, qfmt; qfmt empty: none) as for `attend_q`. Returns the new x.
at::Tensor block(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& qkv,
                 const std::optional<at::Tensor>& qkv_bias, const at::Tensor& o, const std::optional<at::Tensor>& o_bias,
                 const at::Tensor& mlp_norm, const at::Tensor& gate_up, const std::optional<at::Tensor>& gate_up_bias,
                 const at::Tensor& down, const std::optional<at::Tensor>& down_bias, const at::Tensor& rot,
                 const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& write,
                 const at::Tensor& rows, const at::Tensor& extra, const at::Tensor& holes, const at::Tensor& kq,
                 const at::Tensor& vq, const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& qfmt,
                 int64_t n_heads, int64_t n_kv_heads, double eps, const std::optional<at::Tensor>& q_norm,
                 const std::optional<at::Tensor>& k_norm, const std::optional<at::Tensor>& post_attn_norm,
                 const std::optional<at::Tensor>& post_mlp_norm, const std::optional<at::Tensor>& qkv_scales,
                 const std::optional<at::Tensor>& o_scales, const std::optional<at::Tensor>& gate_up_scales,
                 const std::optional<at::Tensor>& down_scales, double q_scale, bool gelu) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "gearshift::block: x");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous() && write.is_contiguous() && rot.is_contiguous(),
              "gearshift::block: contiguous cache, write and rot");
  const int64_t T = x.size(0), D = cache_k.size(3), H = n_heads, KVH = n_kv_heads;
  TORCH_CHECK(cache_k.size(2) == KVH && rot.size(0) == T && rot.numel() == T * D && write.numel() == T,
              "gearshift::block: shapes do not match");

  // attention half
  at::Tensor h = packed(rms_norm(x, attn_norm, eps), qkv, qkv_scales);  // [T, (H + 2 KVH) D]
  add_bias(h, qkv_bias);
  const int64_t width = (H + 2 * KVH) * D;
  float* hp = h.data_ptr<float>();
  const float* rp = rot.data_ptr<float>();
  const auto qs = static_cast<float>(q_scale);
  for (int64_t t = 0; t < T; ++t) {  // [QK-norm,] RoPE on q and k: interleaved pairs, one complex multiply each
    if (q_norm.has_value()) {
      norm_heads(hp + t * width, H, D, q_norm->data_ptr<float>(), static_cast<float>(eps));
      norm_heads(hp + t * width + H * D, KVH, D, k_norm->data_ptr<float>(), static_cast<float>(eps));
    }
    const float* cs = rp + t * D;
    for (int64_t head = 0; head < H + KVH; ++head) {
      float* p = hp + t * width + head * D;
      for (int64_t i = 0; i < D / 2; ++i) {
        const float a = p[2 * i], b = p[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        p[2 * i] = a * c - b * s;
        p[2 * i + 1] = a * s + b * c;
      }
      if (q_scale != 1.0 && head < H)
        for (int64_t i = 0; i < D; ++i) p[i] *= qs;
    }
  }
  const int64_t* wp = write.data_ptr<int64_t>();
  float* kp = cache_k.data_ptr<float>();
  float* vp = cache_v.data_ptr<float>();
  const int64_t entry = KVH * D;
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(kp + wp[t] * entry, hp + t * width + H * D, entry * sizeof(float));
    std::memcpy(vp + wp[t] * entry, hp + t * width + (H + KVH) * D, entry * sizeof(float));
  }
  const at::Tensor q = h.narrow(1, 0, H * D).view({T, H, D});
  if (qfmt.numel() > 0)
    quantize_into(h.narrow(1, H * D, KVH * D).view({T, KVH, D}), h.narrow(1, (H + KVH) * D, KVH * D).view({T, KVH, D}),
                  write, kq, vq, ks, vs, qfmt);
  at::Tensor y = attend_q(q, cache_k, cache_v, rows, extra, holes, kq, vq, ks, vs, qfmt).view({T, H * D});
  at::Tensor out = packed(y, o, o_scales);
  add_bias(out, o_bias);
  if (post_attn_norm.has_value()) out = rms_norm(out, *post_attn_norm, eps);
  out.add_(x);

  // MLP half
  at::Tensor gu = packed(rms_norm(out, mlp_norm, eps), gate_up, gate_up_scales);  // [T, 2 F]
  add_bias(gu, gate_up_bias);
  at::Tensor d = packed(gated(gu, gelu), down, down_scales);  // act(gate) * up
  add_bias(d, down_bias);
  if (post_mlp_norm.has_value()) d = rms_norm(d, *post_mlp_norm, eps);
  return d.add_(out);
}

TORCH_LIBRARY_FRAGMENT(gearshift, m) {
  m.def(
      "block(Tensor x, Tensor attn_norm, Tensor qkv, Tensor? qkv_bias, Tensor o, Tensor? o_bias, Tensor mlp_norm, "
      "Tensor gate_up, Tensor? gate_up_bias, Tensor down, Tensor? down_bias, Tensor rot, Tensor cache_k, "
      "Tensor cache_v, Tensor write, Tensor rows, Tensor extra, Tensor holes, Tensor kq, Tensor vq, Tensor ks, "
      "Tensor vs, Tensor qfmt, int n_heads, int n_kv_heads, float eps, Tensor? q_norm, Tensor? k_norm, "
      "Tensor? post_attn_norm, Tensor? post_mlp_norm, Tensor? qkv_scales, Tensor? o_scales, Tensor? gate_up_scales, "
      "Tensor? down_scales, float q_scale, bool gelu) -> Tensor",
      &block);
}
