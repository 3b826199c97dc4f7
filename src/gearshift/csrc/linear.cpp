// Weight-only quantized matrix products for a few rows at a time: y = x W^T, x float32 [M, K].
//
// Decoding multiplies one row (or k rows, when speculative decoding verifies k tokens) by every
// weight of the model, so the cost is reading and unpacking the weights, then multiplying. Both
// kernels unpack a piece of the weights once and apply it to up to four rows before moving on,
// so scoring k tokens costs far less than k one-token steps (the verify curve speculative
// decoding needs), and each thread streams its own columns' bytes in order.
//
// q4 (the layers): each row of x is first quantized to int8 in blocks of 32 (dx = max|x| / 127),
// and the 4-bit codes (unsigned) multiply it as integers, 32 products per instruction: `vpdpbusd`
// where the CPU has VNNI (AVX-512 VNNI or AVX-VNNI), else `maddubs` and `madd`, the same exact
// int32 sums, so the same bits (tested against a build without VNNI); per block, y += d * dx *
// (q . xq) + m * sum(xq), in float. A block whose largest value is more than 4x its RMS (an outlier
// sets the scale, and int8 would leave the rest a few levels) also gets its residual as int8 codes
// on a 254x finer scale, a second pass that brings it to about int16's resolution: on SmolLM2 that
// is 20% of blocks, and it takes the KL divergence from float activations from 0.0022 (int8 alone)
// to 0.0004, top-1 agreement 0.995 (teacher-forced on Spec-Bench prompts, same int4 weights). The
// int16 activations this kernel had before were exact to 2e-5 but did half the products per
// instruction: an extra row of SmolLM2's layers cost ~0.75 ms on a 2-core Zen 4, now ~0.45.
//   Layout: [N/16, K/32, 320] bytes per (tile of 16 output columns, block of 32 inputs): fp16
//   scales d of the 16 columns, fp16 mins m, then 8 chunks of 32 bytes; chunk c byte 2j + p holds
//   the code of input 4c + p of column j in its low nibble and of input 4c + 2 + p in its high
//   nibble, so an AND (or a shift and an AND) and an interleave of 16-bit pairs give the 32-bit
//   lanes of 4 inputs per column that `vpdpbusd` multiplies with (x[k], ..., x[k+3]).
//   w = q * d + m (GGUF's Q4_1 block: min/max quantization with fp16 d and m).
// q8 (the LM head; every layer of a file with 5-8-bit weights): int16 activations (dx = max|x| /
//   32767 per block of 32, an error below 2e-5 of the block's largest value) times int8 weights
//   widened to 16 bits, in pair products (`vpdpwssd`, or `madd` and `add`), tiles of 8 columns:
//   int8 [N/8, K/2, 8, 2] (stored as [N/8, K, 8]): inputs 2c and 2c + 1 of the tile's 8 columns, as
//   the 16 bytes (w[2c][0], w[2c+1][0], w[2c][1], ...), and a float32 scale per column; w = q * s.
//   (Converting the int8 weights to float for float FMAs, as this kernel did before, left the LM
//   head compute-bound at about a third of the memory bandwidth; integer pairs do 16 products
//   per instruction where that did 8 in about five.)
//
// Exactness: every output element is computed by one fixed sequence of operations (integer sums
// are exact; float steps in a fixed order per row and column), whatever M is and however rows
// and columns are tiled or split across threads. So a row's result never depends on which other
// rows share the call, which keeps batched decoding bit-identical to one sequence decoded alone.
//
// Only built with AVX2 + FMA + F16C (VNNI where the CPU has it: `kernels.vnni`); elsewhere
// `simd()` says false and the engine uses PyTorch's packed kernels instead.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GEARSHIFT_LINEAR 1
#endif

namespace {

#ifdef GEARSHIFT_LINEAR

constexpr int64_t BLOCK = 32, Q4_COLS = 16, Q4_TILE_BYTES = 320, Q8_COLS = 8, Q8_BLOCK_BYTES = BLOCK * Q8_COLS;
constexpr int64_t PREFETCH = 8;  // blocks ahead

// x quantized per row and block: int16 codes, scale, and the float sum of the block.
struct QuantRows {
  const int16_t* q;
  const float* dx;
  const float* xs;
  int64_t K, nb;
};

void quantize_rows(const float* x, int64_t M, int64_t K, int16_t* q, float* dx, float* xs) {
  const int64_t nb = K / BLOCK;
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* xb = x + i * BLOCK;
    float amax = 0.f, sum = 0.f;
    for (int64_t j = 0; j < BLOCK; ++j) {
      amax = std::max(amax, std::fabs(xb[j]));
      sum += xb[j];
    }
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    for (int64_t j = 0; j < BLOCK; ++j) q[i * BLOCK + j] = static_cast<int16_t>(std::nearbyint(xb[j] * inv));
    dx[i] = amax / 32767.f;
    xs[i] = sum;
  }
}

inline __m256i pair(const int16_t* p) {  // (x[k], x[k+1]) in every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// VNNI (`vpdpwssd`) fuses the pair multiply (`madd`) and the add: the same exact integers.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define GEARSHIFT_VNNI 1
inline __m256i dpwssd(__m256i acc, __m256i w, __m256i x) { return _mm256_dpwssd_epi32(acc, w, x); }
#elif defined(__AVXVNNI__)
#define GEARSHIFT_VNNI 1
inline __m256i dpwssd(__m256i acc, __m256i w, __m256i x) { return _mm256_dpwssd_avx_epi32(acc, w, x); }
#else
#define GEARSHIFT_VNNI 0
#endif

// x quantized per row and block for the int4 layers: int8 codes q (x ~ dx * q), and for a block
// whose largest value is more than 4x its root mean square (an outlier sets its scale and leaves
// the other values a few levels), the residual x - dx * q as int8 codes r on a 254x finer scale, so
// that x ~ dx / 254 * (254 q + r): about the resolution of int16. `scale` is dx, or dx / 254 where
// `fine` is set; xs the sum of the quantized block, scale * sum(codes), for the mins: with the exact
// float sum the products would be those of weights q * d (codes 0..15, all of one sign) and not of
// q * d + m (centred), and the rounding errors of x would add up instead of partly cancelling
// (measured on SmolLM2: 4x the KL divergence from float activations).
struct QuantRows8 {
  const int8_t* q;
  const int8_t* r;
  const uint8_t* fine;
  const float* scale;
  const float* xs;
  int64_t K, nb;
};

constexpr float OUTLIER = 4.f;  // max|x| / rms(x) of a block above which it gets its residual codes

// 32 int32 codes (four vectors of 8) as 32 int8 in order (they fit: |code| <= 127).
inline void store_codes(int8_t* dst, __m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline float hmax_ps(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// One block of 32 at a time, in vector instructions (a fixed order per block, so per row): the
// conversions round to nearest even, as std::nearbyint does.
void quantize_rows8(const float* x, int64_t M, int64_t K, int8_t* q, int8_t* r, uint8_t* fine, float* scale,
                    float* xs) {
  const int64_t nb = K / BLOCK;
  const __m256 sign = _mm256_set1_ps(-0.f), lim = _mm256_set1_ps(127.f);
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* xb = x + i * BLOCK;
    __m256 v[4], amax = _mm256_setzero_ps(), ss = _mm256_setzero_ps();
    for (int u = 0; u < 4; ++u) {
      v[u] = _mm256_loadu_ps(xb + 8 * u);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[u]));
      ss = _mm256_fmadd_ps(v[u], v[u], ss);
    }
    const float am = hmax_ps(amax), sq = gearshift_simd::hsum(ss);
    const float dx = am / 127.f, inv = am > 0.f ? 127.f / am : 0.f;
    __m256i c[4], sum = _mm256_setzero_si256();
    for (int u = 0; u < 4; ++u) {
      c[u] = _mm256_cvtps_epi32(_mm256_mul_ps(v[u], _mm256_set1_ps(inv)));
      sum = _mm256_add_epi32(sum, c[u]);
    }
    store_codes(q + i * BLOCK, c[0], c[1], c[2], c[3]);
    fine[i] = am * am * static_cast<float>(BLOCK) > OUTLIER * OUTLIER * sq;
    if (fine[i]) {  // the residual on a 254x finer scale, clamped to the int8 range
      sum = _mm256_mullo_epi32(sum, _mm256_set1_epi32(254));
      __m256i e[4];
      for (int u = 0; u < 4; ++u) {
        const __m256 left = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(c[u]), _mm256_set1_ps(dx), v[u]);  // x - dx q
        __m256 res = _mm256_mul_ps(left, _mm256_set1_ps(254.f * inv));
        res = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(res, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                          _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
        e[u] = _mm256_cvtps_epi32(res);
        sum = _mm256_add_epi32(sum, e[u]);
      }
      store_codes(r + i * BLOCK, e[0], e[1], e[2], e[3]);
    }
    scale[i] = fine[i] ? dx / 254.f : dx;
    xs[i] = scale[i] * static_cast<float>(hsum_epi32(sum));  // the sum of the quantized block (see QuantRows8)
  }
}

inline __m256i quad(const int8_t* p) {  // (x[k], ..., x[k+3]) in every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Sums of 4 products of unsigned 4-bit codes and signed int8 codes per 32-bit lane, added to acc:
// `vpdpbusd` where the CPU has VNNI, else `maddubs` (pairs to int16: |2 * 15 * 127| fits) and a
// `madd` by ones: the same integers either way.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#elif defined(__AVXVNNI__)
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#else
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif

// The codes of chunk c as 32-bit lanes of 4 inputs (4c .. 4c + 3) per column: (a) columns 0-3 and
// 8-11, (b) columns 4-7 and 12-15 (interleaving the 16-bit pairs of the low and high nibbles).
inline void quads(const uint8_t* blk, int c, __m256i& a, __m256i& b) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 + 32 * c));
  const __m256i v0 = _mm256_and_si256(raw, nibble), v1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
  a = _mm256_unpacklo_epi16(v0, v1);
  b = _mm256_unpackhi_epi16(v0, v1);
}

// R rows from r0 times one tile of 16 columns. Per block, each row's int8 codes meet the 4-bit codes
// in sums of 4 products (exact int32: |q . xq| < 32 * 15 * 127); a row whose block has residual codes
// adds a second pass, 254 * sum(q) + sum(r) (< 2^24, so exact in float too). Lanes hold columns in
// the order the quads give them (0-3, 8-11 | 4-7, 12-15), the scales and mins are put in the same
// order, and the results go back in column order at the end. One or two rows split their sums over
// more chains (the fused instruction's latency is ~4-5 cycles).
template <int R>
void q4_tile(const QuantRows8& x, const uint8_t* W, float* y, int64_t N, int64_t r0, int64_t t) {
  constexpr int S = R == 1 ? 4 : R == 2 ? 2 : 1;
  const int64_t nb = x.nb;
  __m256 fa[R], fb[R];
  for (int r = 0; r < R; ++r) fa[r] = fb[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = W + (t * nb + b) * Q4_TILE_BYTES;
    for (int l = 0; l < Q4_TILE_BYTES; l += 64)  // the stream runs ahead of the arithmetic
      _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH * Q4_TILE_BYTES + l), _MM_HINT_T0);
    __m256i ia[S][R], ib[S][R];
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < R; ++r) ia[s][r] = ib[s][r] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      __m256i wa, wb;
      quads(blk, c, wa, wb);
      for (int r = 0; r < R; ++r) {
        const __m256i xv = quad(x.q + (r0 + r) * x.K + b * BLOCK + 4 * c);
        ia[c % S][r] = dpbusd(ia[c % S][r], wa, xv);
        ib[c % S][r] = dpbusd(ib[c % S][r], wb, xv);
      }
    }
    const __m256 dlo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m256 dhi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
    const __m256 mlo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32)));
    const __m256 mhi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 48)));
    const __m256 da = _mm256_permute2f128_ps(dlo, dhi, 0x20), db = _mm256_permute2f128_ps(dlo, dhi, 0x31);
    const __m256 ma = _mm256_permute2f128_ps(mlo, mhi, 0x20), mb = _mm256_permute2f128_ps(mlo, mhi, 0x31);
    for (int r = 0; r < R; ++r) {
      const int64_t i = (r0 + r) * nb + b;
      __m256i sa = ia[0][r], sb = ib[0][r];
      for (int s = 1; s < S; ++s) sa = _mm256_add_epi32(sa, ia[s][r]), sb = _mm256_add_epi32(sb, ib[s][r]);
      if (x.fine[i]) {  // the residual pass: rare (a few blocks with an outlier), one row at a time
        __m256i ra[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, rb[2] = {ra[0], ra[0]};
        for (int c = 0; c < 8; ++c) {
          __m256i wa, wb;
          quads(blk, c, wa, wb);
          const __m256i xv = quad(x.r + (r0 + r) * x.K + b * BLOCK + 4 * c);
          ra[c % 2] = dpbusd(ra[c % 2], wa, xv);
          rb[c % 2] = dpbusd(rb[c % 2], wb, xv);
        }
        const __m256i k254 = _mm256_set1_epi32(254);
        sa = _mm256_add_epi32(_mm256_mullo_epi32(sa, k254), _mm256_add_epi32(ra[0], ra[1]));
        sb = _mm256_add_epi32(_mm256_mullo_epi32(sb, k254), _mm256_add_epi32(rb[0], rb[1]));
      }
      const __m256 dx = _mm256_set1_ps(x.scale[i]), xs = _mm256_set1_ps(x.xs[i]);
      fa[r] = _mm256_fmadd_ps(ma, xs, _mm256_fmadd_ps(_mm256_mul_ps(da, dx), _mm256_cvtepi32_ps(sa), fa[r]));
      fb[r] = _mm256_fmadd_ps(mb, xs, _mm256_fmadd_ps(_mm256_mul_ps(db, dx), _mm256_cvtepi32_ps(sb), fb[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + (r0 + r) * N + t * Q4_COLS, _mm256_permute2f128_ps(fa[r], fb[r], 0x20));
    _mm256_storeu_ps(y + (r0 + r) * N + t * Q4_COLS + 8, _mm256_permute2f128_ps(fa[r], fb[r], 0x31));
  }
}

// R rows from r0 times one tile of 8 columns. The int8 weights widen to 16 bits and meet the
// rows' int16 codes in the same pair products as q4 (exact int32 sums per block: |sum| < 32 * 127 *
// 32767); each block's sum is scaled by the row's block scale, the total by the columns' scales. One
// or two rows split their sums over more chains (the fused VNNI instruction's latency), like q4.
template <int R>
void q8_tile(const QuantRows& x, const int8_t* W, const float* s, float* y, int64_t N, int64_t r0, int64_t t) {
  constexpr int S = R == 1 ? 4 : R == 2 ? 2 : 1;
  const int64_t nb = x.nb;
  const int8_t* tile = W + t * x.K * Q8_COLS;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* blk = tile + b * Q8_BLOCK_BYTES;
    for (int l = 0; l < Q8_BLOCK_BYTES; l += 64)
      _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH * Q8_BLOCK_BYTES + l), _MM_HINT_T0);
    __m256i is[S][R];
    for (int c = 0; c < S; ++c)
      for (int r = 0; r < R; ++r) is[c][r] = _mm256_setzero_si256();
    for (int c = 0; c < BLOCK / 2; ++c) {  // inputs 2c, 2c + 1: 16-bit lanes (w[2c][j], w[2c+1][j])
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * c)));
      for (int r = 0; r < R; ++r) {
        const __m256i xp = pair(x.q + (r0 + r) * x.K + b * BLOCK + 2 * c);
#if GEARSHIFT_VNNI
        is[c % S][r] = dpwssd(is[c % S][r], w, xp);
#else
        is[c % S][r] = _mm256_add_epi32(is[c % S][r], _mm256_madd_epi16(w, xp));
#endif
      }
    }
    for (int r = 0; r < R; ++r) {
      __m256i sum = is[0][r];
      for (int c = 1; c < S; ++c) sum = _mm256_add_epi32(sum, is[c][r]);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x.dx[(r0 + r) * nb + b]), _mm256_cvtepi32_ps(sum), acc[r]);
    }
  }
  const __m256 sc = _mm256_loadu_ps(s + t * Q8_COLS);
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + (r0 + r) * N + t * Q8_COLS, _mm256_mul_ps(acc[r], sc));
}

using std::integral_constant;

// Threads own ranges of column tiles; within a range, rows go in groups of four, then the rest.
template <typename Tile>
void run_tiles(int64_t M, int64_t tiles, int64_t grain, Tile tile) {
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t r = 0;
      for (; r + 4 <= M; r += 4) tile(integral_constant<int, 4>(), r, t);
      switch (M - r) {
        case 3: tile(integral_constant<int, 3>(), r, t); break;
        case 2: tile(integral_constant<int, 2>(), r, t); break;
        case 1: tile(integral_constant<int, 1>(), r, t); break;
        default: break;
      }
    }
  });
}

// Tiles per thread task: about 2^14 * cols multiply-adds (a few microseconds), so the smallest
// products stay on one thread and the rest are split evenly.
inline int64_t grain(int64_t M, int64_t K) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, M * K)); }

#endif

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == K,
              "gearshift linear: x must be contiguous float32 [M, ", K, "]");
}

}  // namespace

bool simd() {
#ifdef GEARSHIFT_LINEAR
  return true;
#else
  return false;
#endif
}

// x [M, K] float32, tiles [N/16, K/32, 320] uint8 -> [M, N] float32
at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& tiles) {
#ifdef GEARSHIFT_LINEAR
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 3 &&
              tiles.size(2) == Q4_TILE_BYTES, "gearshift::linear_q4: tiles must be contiguous uint8 [N/16, K/32, 320]");
  const int64_t N = tiles.size(0) * Q4_COLS, nb = tiles.size(1), K = nb * BLOCK;
  check_x(x, K);
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  auto codes = at::empty({2, M, K}, x.options().dtype(at::kChar));
  auto fine = at::empty({M, nb}, x.options().dtype(at::kByte));
  auto scales = at::empty({2, M, nb}, x.options());
  int8_t* cp = codes.data_ptr<int8_t>();
  float* rs = scales.data_ptr<float>();  // (pointers, not scales[0]: a tensor view per call costs ~1 us)
  quantize_rows8(x.data_ptr<float>(), M, K, cp, cp + M * K, fine.data_ptr<uint8_t>(), rs, rs + M * nb);
  const QuantRows8 rows{cp, cp + M * K, fine.data_ptr<uint8_t>(), rs, rs + M * nb, K, nb};
  const uint8_t* wp = tiles.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  run_tiles(M, N / Q4_COLS, std::max<int64_t>(1, grain(M, K) / 2), [&](auto rr, int64_t r0, int64_t t) {
    q4_tile<decltype(rr)::value>(rows, wp, yp, N, r0, t);
  });
  return y;
#else
  TORCH_CHECK(false, "gearshift::linear_q4 needs AVX2, FMA and F16C");
#endif
}

// x [M, K] float32, tiles int8 [N/8, K, 8], scale [N] float32 -> [M, N] float32
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scale) {
#ifdef GEARSHIFT_LINEAR
  TORCH_CHECK(tiles.scalar_type() == at::kChar && tiles.is_contiguous() && tiles.dim() == 3 && tiles.size(2) == 8 &&
              tiles.size(1) % BLOCK == 0 && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
              scale.numel() == tiles.size(0) * 8,
              "gearshift::linear_q8: tiles must be contiguous int8 [N/8, K, 8] (K a multiple of 32), scale float32 [N]");
  const int64_t N = tiles.size(0) * Q8_COLS, K = tiles.size(1), nb = K / BLOCK;
  check_x(x, K);
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  auto xq = at::empty({M, K}, x.options().dtype(at::kShort));
  auto scales = at::empty({2, M, nb}, x.options());
  float* rs = scales.data_ptr<float>();
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int16_t>(), rs, rs + M * nb);
  const QuantRows rows{xq.data_ptr<int16_t>(), rs, rs + M * nb, K, nb};
  const int8_t* wp = tiles.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  run_tiles(M, N / Q8_COLS, std::max<int64_t>(1, grain(M, K) / 2), [&](auto rr, int64_t r0, int64_t t) {
    q8_tile<decltype(rr)::value>(rows, wp, sp, yp, N, r0, t);
  });
  return y;
#else
  TORCH_CHECK(false, "gearshift::linear_q8 needs AVX2, FMA and F16C");
#endif
}

TORCH_LIBRARY_FRAGMENT(gearshift, m) {
  m.def("simd() -> bool", &simd);
  m.def("linear_q4(Tensor x, Tensor tiles) -> Tensor", &linear_q4);
  m.def("linear_q8(Tensor x, Tensor tiles, Tensor scale) -> Tensor", &linear_q8);
}
