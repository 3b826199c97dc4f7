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

// A quantized slot's second copy of its entries (`kv_cache.py`): per position and KV head, D bytes
// (int8: one signed byte per channel; int4: byte i holds channel i in its low nibble and channel
// i + D/2 in its high one) and 4 floats (int8: the scale; int4: scale and minimum of each half).
struct Quant {
  int64_t fmt = 0;  // 0: float32 only, 1: int8, 2: int4
  const uint8_t* kq = nullptr;
  const uint8_t* vq = nullptr;
  const float* ks = nullptr;
  const float* vs = nullptr;
  int64_t qstride = 0;  // bytes between positions
  int64_t sstride = 0;  // floats between positions' scales
  int64_t mq = 0;  // the unit's first mq keys are read from this copy, the rest (its recent ones) in float32
};

// Entry `pos` of one KV head into D floats.
void dequant(const Quant& z, const uint8_t* base, const float* scales, int64_t pos, int64_t D, float* dst) {
  const uint8_t* b = base + pos * z.qstride;
  const float* s = scales + pos * z.sstride;
  if (z.fmt == 1) {
    const int8_t* c = reinterpret_cast<const int8_t*>(b);
#ifdef GEARSHIFT_AVX2
    if (D % 8 == 0) {
      const __m256 vs = _mm256_set1_ps(s[0]);
      for (int64_t i = 0; i < D; i += 8) {
        __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i)));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(w), vs));
      }
      return;
    }
#endif
    for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<float>(c[i]) * s[0];
    return;
  }
  const int64_t half = D / 2;
#ifdef GEARSHIFT_AVX2
  if (half % 8 == 0) {
    const __m256 s0 = _mm256_set1_ps(s[0]), m0 = _mm256_set1_ps(s[1]);
    const __m256 s1 = _mm256_set1_ps(s[2]), m1 = _mm256_set1_ps(s[3]);
    const __m256i low = _mm256_set1_epi32(0x0F);
    for (int64_t i = 0; i < half; i += 8) {
      __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + i)));
      _mm256_storeu_ps(dst + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w, low)), s0, m0));
      _mm256_storeu_ps(dst + half + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4)), s1, m1));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < half; ++i) {
    dst[i] = static_cast<float>(b[i] & 0x0F) * s[0] + s[1];
    dst[half + i] = static_cast<float>(b[i] >> 4) * s[2] + s[3];
  }
}

#ifdef GEARSHIFT_AVX2
// ph[j] = e^(ph[j] - mx) for j < m; returns their sum (8 at a time, the tail as one padded vector).
float exp_sum(float* ph, int64_t m, float mx) {
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
  return hsum(sum) + tail_sum;
}
#else
float exp_sum(float* ph, int64_t m, float mx) {
  float sum = 0.f;
  for (int64_t j = 0; j < m; ++j) {
    ph[j] = std::exp(ph[j] - mx);
    sum += ph[j];
  }
  return sum;
}
#endif

// One row, one KV head: G query heads (q, times `scale` as they are read) against m keys at `keys`.
// Keys are the outer loop and the G heads the inner one, so each key and value is loaded once for
// the heads that share it (grouped-query attention), and the heads' running sums of values are
// independent chains (one chain per head and 8 channels would wait on the FMA's latency at every
// key). Per head, every score and sum is the same sequence of operations as one head alone.
constexpr int64_t MAX_G = 8;

void attend_unit(const float* q, float scale, const float* kbase, const float* vbase, const int64_t* keys,
                 int64_t m, int64_t G, int64_t D, int64_t stride, float* out, int64_t out_stride,
                 std::vector<float>& p) {
  p.resize(m * G + 8);
#ifdef GEARSHIFT_AVX2
  if (D == 64 && G <= MAX_G) {
    constexpr int64_t V = 8;
    __m256 qv[MAX_G][V];
    const __m256 vs = _mm256_set1_ps(scale);
    for (int64_t h = 0; h < G; ++h)
      for (int64_t i = 0; i < V; ++i) qv[h][i] = _mm256_mul_ps(_mm256_loadu_ps(q + h * D + 8 * i), vs);
    float mx[MAX_G];
    for (int64_t h = 0; h < G; ++h) mx[h] = -INFINITY;
    for (int64_t j = 0; j < m; ++j) {
      const float* kj = kbase + keys[j] * stride;
      __m256 k[V];
      for (int64_t i = 0; i < V; ++i) k[i] = _mm256_loadu_ps(kj + 8 * i);
      for (int64_t h = 0; h < G; ++h) {
        __m256 a0 = _mm256_mul_ps(qv[h][0], k[0]), a1 = _mm256_mul_ps(qv[h][1], k[1]);
        for (int64_t i = 2; i < V; i += 2) {
          a0 = _mm256_fmadd_ps(qv[h][i], k[i], a0);
          a1 = _mm256_fmadd_ps(qv[h][i + 1], k[i + 1], a1);
        }
        const float sc = hsum(_mm256_add_ps(a0, a1));
        p[h * m + j] = sc;
        mx[h] = std::max(mx[h], sc);
      }
    }
    float inv[MAX_G];
    for (int64_t h = 0; h < G; ++h) inv[h] = 1.0f / exp_sum(p.data() + h * m, m, mx[h]);
    // values: heads in pairs, so each pass keeps 16 running sums in flight
    for (int64_t h0 = 0; h0 < G; h0 += 2) {
      const int64_t n = std::min<int64_t>(2, G - h0);
      __m256 acc[2][V];
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t i = 0; i < V; ++i) acc[h][i] = _mm256_setzero_ps();
      const float* p0 = p.data() + h0 * m;
      const float* p1 = n > 1 ? p0 + m : p0;
      for (int64_t j = 0; j < m; ++j) {
        const float* vj = vbase + keys[j] * stride;
        const __m256 w0 = _mm256_set1_ps(p0[j]), w1 = _mm256_set1_ps(p1[j]);
        for (int64_t i = 0; i < V; ++i) {
          const __m256 x = _mm256_loadu_ps(vj + 8 * i);
          acc[0][i] = _mm256_fmadd_ps(w0, x, acc[0][i]);
          acc[1][i] = _mm256_fmadd_ps(w1, x, acc[1][i]);
        }
      }
      for (int64_t h = 0; h < n; ++h) {
        const __m256 vinv = _mm256_set1_ps(inv[h0 + h]);
        for (int64_t i = 0; i < V; ++i)
          _mm256_storeu_ps(out + (h0 + h) * out_stride + 8 * i, _mm256_mul_ps(acc[h][i], vinv));
      }
    }
    return;
  }
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
      const float inv = 1.0f / exp_sum(ph, m, mx);
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

float dot(const float* a, const float* b, int64_t D) {
#ifdef GEARSHIFT_AVX2
  if (D % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum(acc);
  }
#endif
  float s = 0.f;
  for (int64_t i = 0; i < D; ++i) s += a[i] * b[i];
  return s;
}

void axpy(float w, const float* x, float* y, int64_t D) {
#ifdef GEARSHIFT_AVX2
  if (D % 8 == 0) {
    const __m256 vw = _mm256_set1_ps(w);
    for (int64_t i = 0; i < D; i += 8)
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    return;
  }
#endif
  for (int64_t i = 0; i < D; ++i) y[i] += w * x[i];
}

// attend_unit for a quantized slot: the first z.mq keys come from the quantized copy. Keys are the
// outer loop, so each is dequantized once for the G query heads that share it.
void attend_unit_q(const float* q, float scale, const float* kbase, const float* vbase, const int64_t* keys,
                   int64_t m, int64_t G, int64_t D, int64_t stride, float* out, int64_t out_stride,
                   std::vector<float>& p, const Quant& z) {
  p.resize(m * G + (G + 1) * D);
  float* qs = p.data() + m * G;  // the G queries times scale
  float* tmp = qs + G * D;
  for (int64_t i = 0; i < G * D; ++i) qs[i] = q[i] * scale;
  std::vector<float> mx(G, -INFINITY), sum(G, 0.f);
  for (int64_t j = 0; j < m; ++j) {
    const float* kj = kbase + keys[j] * stride;
    if (j < z.mq) {
      dequant(z, z.kq, z.ks, keys[j], D, tmp);
      kj = tmp;
    }
    for (int64_t h = 0; h < G; ++h) {
      const float s = dot(qs + h * D, kj, D);
      p[h * m + j] = s;
      mx[h] = std::max(mx[h], s);
    }
  }
  for (int64_t h = 0; h < G; ++h) {
    sum[h] = exp_sum(p.data() + h * m, m, mx[h]);
    std::fill(out + h * out_stride, out + h * out_stride + D, 0.f);
  }
  for (int64_t j = 0; j < m; ++j) {
    const float* vj = vbase + keys[j] * stride;
    if (j < z.mq) {
      dequant(z, z.vq, z.vs, keys[j], D, tmp);
      vj = tmp;
    }
    for (int64_t h = 0; h < G; ++h) axpy(p[h * m + j], vj, out + h * out_stride, D);
  }
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < D; ++d) out[h * out_stride + d] /= sum[h];
}

}  // namespace

// q [T, H, D]; k, v [slots, max_len, KVH, D] (one layer); rows [T, 4] int64: slot, n, e0, e1
// (keys: positions 0..n-1, then extra[e0:e1]), or [T, 5] with lo, a sliding-window layer's first
// position (keys: positions lo..n-1, then the extra ones); holes [slots, KVH, 2] int64 (or empty): per slot and
// KV head, positions [a, b) that hold no entry (what a KV policy dropped; `KVCache.holes`), skipped.
// Quantized slots (qfmt [slots, 2] int64: format, recent; or empty): a row reads all but its last
// `recent` keys from kq/vq [slots, max_len, KVH, D] uint8 with ks/vs [slots, max_len, KVH, 4] float.
// Returns [T, H, D].
at::Tensor attend_q(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                    const at::Tensor& extra, const at::Tensor& holes, const at::Tensor& kq, const at::Tensor& vq,
                    const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& qfmt) {
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
  TORCH_CHECK(rows.dim() == 2 && (rows.size(1) == 4 || rows.size(1) == 5) && rows.size(0) == T,
              "gearshift::attend: rows must be [T, 4] or [T, 5]");
  const int64_t rc = rows.size(1);
  const bool has_holes = holes.numel() > 0;
  TORCH_CHECK(!has_holes || (holes.dim() == 3 && holes.size(0) == k.size(0) && holes.size(1) == KVH
                             && holes.size(2) == 2), "gearshift::attend: holes must be [slots, KVH, 2]");
  const int64_t* hp = has_holes ? holes.data_ptr<int64_t>() : nullptr;
  const bool quant = qfmt.numel() > 0;
  if (quant) {
    TORCH_CHECK(qfmt.dim() == 2 && qfmt.size(0) == k.size(0) && qfmt.size(1) == 2 && qfmt.is_contiguous()
                && kq.scalar_type() == at::kByte && vq.scalar_type() == at::kByte && kq.is_contiguous()
                && vq.is_contiguous() && ks.scalar_type() == at::kFloat && vs.scalar_type() == at::kFloat
                && ks.is_contiguous() && vs.is_contiguous() && kq.sizes() == k.sizes() && vq.sizes() == k.sizes()
                && ks.size(0) == k.size(0) && ks.size(1) == L && ks.size(2) == KVH && ks.size(3) == 4
                && vs.sizes() == ks.sizes(), "gearshift::attend: bad quantized cache");
  }
  const int64_t* fp = quant ? qfmt.data_ptr<int64_t>() : nullptr;

  at::parallel_for(0, T * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p;
    std::vector<int64_t> keys;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t t = unit / KVH, g = unit % KVH;
      const int64_t* r = rp + rc * t;
      const int64_t slot = r[0], n = r[1], e0 = r[2], e1 = r[3], lo = rc == 5 ? r[4] : 0;
      TORCH_CHECK(slot >= 0 && n >= 0 && n + (e1 - e0) <= L && n + (e1 - e0) > 0 && lo >= 0,
                  "gearshift::attend: bad row");
      int64_t a = 0, b = 0;  // the hole [a, b) within [0, n)
      if (hp != nullptr) {
        b = std::min(hp[2 * (slot * KVH + g) + 1], n);
        a = std::min(hp[2 * (slot * KVH + g)], b);
      }
      keys.clear();
      for (int64_t j = lo; j < a; ++j) keys.push_back(j);
      for (int64_t j = std::max(b, lo); j < n; ++j) keys.push_back(j);
      for (int64_t j = e0; j < e1; ++j) keys.push_back(xp[j]);
      TORCH_CHECK(!keys.empty(), "gearshift::attend: a row with no keys");
      const int64_t m = static_cast<int64_t>(keys.size());
      const float* qrow = qp + (t * H + g * G) * D;
      float* orow = op + (t * H + g * G) * D;
      const int64_t base = slot * L * stride + g * D;
      if (fp != nullptr && fp[2 * slot] != 0 && m > fp[2 * slot + 1]) {
        Quant z;
        z.fmt = fp[2 * slot];
        z.kq = kq.data_ptr<uint8_t>() + base;
        z.vq = vq.data_ptr<uint8_t>() + base;
        z.ks = ks.data_ptr<float>() + (slot * L * KVH + g) * 4;
        z.vs = vs.data_ptr<float>() + (slot * L * KVH + g) * 4;
        z.qstride = stride;
        z.sstride = KVH * 4;
        z.mq = m - fp[2 * slot + 1];
        attend_unit_q(qrow, scale, kp + base, vp + base, keys.data(), m, G, D, stride, orow, D, p, z);
      } else {
        attend_unit(qrow, scale, kp + base, vp + base, keys.data(), m, G, D, stride, orow, D, p);
      }
    }
  });
  return out;
}

// The quantized copy of one entry (one KV head's D floats), as `kv_cache.quantize` makes it (the
// same float operations in the same order, so both give the same bytes).
void quantize_entry(int64_t fmt, const float* x, int64_t D, uint8_t* codes, float* scales) {
  if (fmt == 1) {
    float mx = 0.f;
    for (int64_t i = 0; i < D; ++i) mx = std::max(mx, std::fabs(x[i]));
    const float s = std::max(mx, 1e-12f) / 127.f;
    for (int64_t i = 0; i < D; ++i)
      codes[i] = static_cast<uint8_t>(static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] / s)))));
    scales[0] = s;
    return;
  }
  const int64_t half = D / 2;
  for (int64_t part = 0; part < 2; ++part) {
    const float* h = x + part * half;
    float lo = h[0], hi = h[0];
    for (int64_t i = 1; i < half; ++i) {
      lo = std::min(lo, h[i]);
      hi = std::max(hi, h[i]);
    }
    const float s = std::max((hi - lo) / 15.f, 1e-12f);
    for (int64_t i = 0; i < half; ++i) {
      const auto c = static_cast<uint8_t>(std::min(15.f, std::max(0.f, std::nearbyint((h[i] - lo) / s))));
      codes[i] = part == 0 ? c : static_cast<uint8_t>(codes[i] | (c << 4));
    }
    scales[2 * part] = s;
    scales[2 * part + 1] = lo;
  }
}

// k, v [T, KVH, D] float rows just written at flat positions `write` [T] (slot * max_len + position)
// of one layer's cache: those in quantized slots (qfmt [slots, 2]) get their quantized copies in
// kq/vq [slots, max_len, KVH, D] uint8 and ks/vs [slots, max_len, KVH, 4].
void quantize_into(const at::Tensor& k, const at::Tensor& v, const at::Tensor& write, const at::Tensor& kq,
                   const at::Tensor& vq, const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& qfmt) {
  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  TORCH_CHECK(kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat && kc.dim() == 3
              && vc.sizes() == kc.sizes() && write.is_contiguous() && write.numel() == kc.size(0)
              && kq.is_contiguous() && vq.is_contiguous() && ks.is_contiguous() && vs.is_contiguous()
              && kq.scalar_type() == at::kByte && kq.size(2) == kc.size(1) && kq.size(3) == kc.size(2)
              && qfmt.size(0) == kq.size(0), "gearshift::quantize_into: shapes do not match");
  const int64_t T = kc.size(0), KVH = kc.size(1), D = kc.size(2), L = kq.size(1);
  const int64_t* wp = write.data_ptr<int64_t>();
  const int64_t* fp = qfmt.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t fmt = fp[2 * (wp[t] / L)];
    if (fmt == 0) continue;
    for (int64_t g = 0; g < KVH; ++g) {
      const int64_t at_ = wp[t] * KVH + g;
      quantize_entry(fmt, kc.data_ptr<float>() + (t * KVH + g) * D, D, kq.data_ptr<uint8_t>() + at_ * D,
                     ks.data_ptr<float>() + at_ * 4);
      quantize_entry(fmt, vc.data_ptr<float>() + (t * KVH + g) * D, D, vq.data_ptr<uint8_t>() + at_ * D,
                     vs.data_ptr<float>() + at_ * 4);
    }
  }
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                  const at::Tensor& extra, const at::Tensor& holes) {
  const at::Tensor none = at::empty({0}, rows.options());
  return attend_q(q, k, v, rows, extra, holes, none, none, none, none, none);
}

TORCH_LIBRARY(gearshift, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor rows, Tensor extra, Tensor holes) -> Tensor", &attend);
  m.def("attend_q(Tensor q, Tensor k, Tensor v, Tensor rows, Tensor extra, Tensor holes, Tensor kq, Tensor vq, "
        "Tensor ks, Tensor vs, Tensor qfmt) -> Tensor", &attend_q);
  m.def("quantize_into(Tensor k, Tensor v, Tensor write, Tensor(a!) kq, Tensor(b!) vq, Tensor(c!) ks, "
        "Tensor(d!) vs, Tensor qfmt) -> ()", &quantize_into);
}
