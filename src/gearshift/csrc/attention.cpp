// Exact attention for every row of a step, in one call per layer.
//
// Each row (a token of some sequence) attends the keys of its own KV cache slot: positions
// [0, n) and then, for a token-tree node, its ancestors' positions (`extra`). A row's result is
// computed by one thread, with the same instructions in the same order whatever else is in the
// call, so it depends only on the row's query and keys: how rows are grouped into calls never
// changes a bit. That is the exactness the engine needs (continuous batching, chunked prefill
// and the prefix cache give the output of a sequence decoded alone), without one library call
// per row.
//
// The work for one row and one KV head: scores of the head's query heads against every key,
// softmax, then the weighted sum of the values. With AVX2 + FMA (and a head dim that is a
// multiple of 8) the loops run on 8-float vectors; otherwise plain C++ loops do the same math.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

#ifdef GEARSHIFT_AVX2
using gearshift_simd::exp8;
using gearshift_simd::hsum;
#endif

// One row, one KV head: G query heads (q, times `scale` as they are read) against m keys at `keys`.
void attend_unit(const float* q, float scale, const float* kbase, const float* vbase, const int64_t* keys,
                 int64_t m, int64_t G, int64_t D, int64_t stride, float* out, int64_t out_stride,
                 std::vector<float>& p) {
  p.resize(m * G + 8);
#ifdef GEARSHIFT_AVX2
  if (D % 8 == 0 && D <= 256) {
    const int64_t V = D / 8;
    for (int64_t h = 0; h < G; ++h) {
      __m256 qv[32];
      const __m256 vs = _mm256_set1_ps(scale);
      for (int64_t i = 0; i < V; ++i) qv[i] = _mm256_mul_ps(_mm256_loadu_ps(q + h * D + 8 * i), vs);
      float* ph = p.data() + h * m;
      float mx = -INFINITY;
      for (int64_t j = 0; j < m; ++j) {
        const float* kj = kbase + keys[j] * stride;
        __m256 a0 = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kj));
        __m256 a1 = V > 1 ? _mm256_mul_ps(qv[1], _mm256_loadu_ps(kj + 8)) : _mm256_setzero_ps();
        for (int64_t i = 2; i + 1 < V; i += 2) {
          a0 = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(kj + 8 * i), a0);
          a1 = _mm256_fmadd_ps(qv[i + 1], _mm256_loadu_ps(kj + 8 * i + 8), a1);
        }
        if (V > 2 && V % 2) a0 = _mm256_fmadd_ps(qv[V - 1], _mm256_loadu_ps(kj + 8 * (V - 1)), a0);
        ph[j] = hsum(_mm256_add_ps(a0, a1));
        mx = std::max(mx, ph[j]);
      }
      __m256 sum = _mm256_setzero_ps();
      const __m256 vmx = _mm256_set1_ps(mx);
      int64_t j = 0;
      for (; j + 8 <= m; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ph + j), vmx));
        _mm256_storeu_ps(ph + j, e);
        sum = _mm256_add_ps(sum, e);
      }
      float tail_sum = 0.f;
      if (j < m) {  // the last few scores: one more vector, padded, of which only the real lanes count
        alignas(32) float tail[8];
        for (int64_t i = 0; i < 8; ++i) tail[i] = j + i < m ? ph[j + i] - mx : 0.f;
        _mm256_store_ps(tail, exp8(_mm256_load_ps(tail)));
        for (int64_t i = 0; j + i < m; ++i) {
          ph[j + i] = tail[i];
          tail_sum += tail[i];
        }
      }
      const float inv = 1.0f / (hsum(sum) + tail_sum);
      __m256 acc[32];
      for (int64_t i = 0; i < V; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t jj = 0; jj < m; ++jj) {
        const __m256 w = _mm256_set1_ps(ph[jj]);
        const float* vj = vbase + keys[jj] * stride;
        for (int64_t i = 0; i < V; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 8 * i), acc[i]);
      }
      const __m256 vinv = _mm256_set1_ps(inv);
      for (int64_t i = 0; i < V; ++i) _mm256_storeu_ps(out + h * out_stride + 8 * i, _mm256_mul_ps(acc[i], vinv));
    }
    return;
  }
#endif
  for (int64_t h = 0; h < G; ++h) {
    float* ph = p.data() + h * m;
    float mx = -INFINITY;
    for (int64_t j = 0; j < m; ++j) {
      const float* kj = kbase + keys[j] * stride;
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += (q[h * D + d] * scale) * kj[d];
      ph[j] = s;
      mx = std::max(mx, s);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < m; ++j) {
      ph[j] = std::exp(ph[j] - mx);
      sum += ph[j];
    }
    float* oh = out + h * out_stride;
    std::fill(oh, oh + D, 0.f);
    for (int64_t j = 0; j < m; ++j) {
      const float* vj = vbase + keys[j] * stride;
      for (int64_t d = 0; d < D; ++d) oh[d] += ph[j] * vj[d];
    }
    for (int64_t d = 0; d < D; ++d) oh[d] /= sum;
  }
}

}  // namespace

// q [T, H, D]; k, v [slots, max_len, KVH, D] (one layer); rows [T, 4] int64: slot, n, e0, e1
// (keys: positions 0..n-1, then extra[e0:e1]); holes [slots, KVH, 2] int64 (or empty): per slot and
// KV head, positions [a, b) that hold no entry (what a KV policy dropped; `KVCache.holes`), skipped.
// Returns [T, H, D].
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                  const at::Tensor& extra, const at::Tensor& holes) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "gearshift::attend takes float32");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && rows.is_contiguous() && extra.is_contiguous()
              && holes.is_contiguous(), "gearshift::attend takes a contiguous cache");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t L = k.size(1), KVH = k.size(2), G = H / KVH;
  TORCH_CHECK(k.size(3) == D && H % KVH == 0 && q.stride(2) == 1, "gearshift::attend: shapes do not match");
  const at::Tensor qc = q.contiguous();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  auto out = at::empty({T, H, D}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* xp = extra.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t stride = KVH * D;
  const bool has_holes = holes.numel() > 0;
  TORCH_CHECK(!has_holes || (holes.dim() == 3 && holes.size(0) == k.size(0) && holes.size(1) == KVH
                             && holes.size(2) == 2), "gearshift::attend: holes must be [slots, KVH, 2]");
  const int64_t* hp = has_holes ? holes.data_ptr<int64_t>() : nullptr;

  at::parallel_for(0, T * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p;
    std::vector<int64_t> keys;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t t = unit / KVH, g = unit % KVH;
      const int64_t slot = rp[4 * t], n = rp[4 * t + 1], e0 = rp[4 * t + 2], e1 = rp[4 * t + 3];
      TORCH_CHECK(slot >= 0 && n >= 0 && n + (e1 - e0) <= L && n + (e1 - e0) > 0, "gearshift::attend: bad row");
      int64_t a = 0, b = 0;  // the hole [a, b) within [0, n)
      if (hp != nullptr) {
        b = std::min(hp[2 * (slot * KVH + g) + 1], n);
        a = std::min(hp[2 * (slot * KVH + g)], b);
      }
      keys.clear();
      for (int64_t j = 0; j < a; ++j) keys.push_back(j);
      for (int64_t j = b; j < n; ++j) keys.push_back(j);
      for (int64_t j = e0; j < e1; ++j) keys.push_back(xp[j]);
      TORCH_CHECK(!keys.empty(), "gearshift::attend: a row with no keys");
      attend_unit(qp + (t * H + g * G) * D, scale, kp + slot * L * stride + g * D, vp + slot * L * stride + g * D,
                  keys.data(), static_cast<int64_t>(keys.size()), G, D, stride, op + (t * H + g * G) * D, D, p);
    }
  });
  return out;
}

TORCH_LIBRARY(gearshift, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor rows, Tensor extra, Tensor holes) -> Tensor", &attend);
}
