// Weight-only quantized matrix products for a few rows at a time: y = x W^T, x float32 [M, K].
//
// Decoding multiplies one row (or k rows, when speculative decoding verifies k tokens) by every
// weight of the model, so the cost is reading and unpacking the weights, then multiplying. Both
// kernels unpack a piece of the weights once and apply it to up to four rows before moving on,
// so scoring k tokens costs far less than k one-token steps (the verify curve speculative
// decoding needs), and each thread streams its own columns' bytes in order.
//
// q4 (the layers): each row of x is first quantized to int16 in blocks of 32 (scale
// dx = max|x| / 32767: an error below 2e-5 of the block's largest value, finer than bf16), and the
// 4-bit codes multiply it as integers, 16 products per instruction (`madd`), summed exactly in
// int32; per block, y += d * dx * (q . xq) + m * sum(x), in float. Where the CPU has VNNI
// (AVX-512 VNNI or AVX-VNNI), `vpdpwssd` does the multiply and the add in one instruction: the
// same integers, so the same bits, in half the instructions. (llama.cpp quantizes x to int8
// for twice the products per instruction; on SmolLM2 that cost 10x the KL divergence from the
// float model, measured, so this kernel keeps 16 bits.)
//   Layout: [N/16, K/32, 320] bytes per (tile of 16 output columns, block of 32 inputs): fp16
//   scales d of the 16 columns, fp16 mins m, then 8 chunks of 32 bytes; chunk c byte 2j + p holds
//   the code of input 4c + p of column j in its low nibble and of input 4c + 2 + p in its high
//   nibble, so an AND (or a shift and an AND) and a widening give the 16-bit lanes `madd` pairs
//   with (x[k], x[k+1]).
//   w = q * d + m (GGUF's Q4_1 block: min/max quantization with fp16 d and m).
// q8 (the LM head; every layer of a file with 5-8-bit weights): the same int16 activations times
//   int8 weights widened to 16 bits, in the same pair products (vpdpwssd / madd), tiles of 8 columns:
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

// R rows from r0 times one tile of 16 columns. Each row keeps its integer sums per block for
// columns 0-7 / 8-15, and with few rows splits them by inputs 4c + {0,1} / 4c + {2,3} too: the
// fused VNNI instruction has a latency of ~4-5 cycles, so one or two rows need more independent
// chains to keep it busy, while four rows have enough and need the registers.
template <int R>
void q4_tile(const QuantRows& x, const uint8_t* W, float* y, int64_t N, int64_t r0, int64_t t) {
  constexpr int S = GEARSHIFT_VNNI && R <= 2 ? 2 : 1;  // chains per column half (`madd` + `add`: one)
  const int64_t nb = x.nb;
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = W + (t * nb + b) * Q4_TILE_BYTES;
    for (int l = 0; l < Q4_TILE_BYTES; l += 64)  // the stream runs ahead of the arithmetic
      _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH * Q4_TILE_BYTES + l), _MM_HINT_T0);
    __m256i ilo[S][R], ihi[S][R];  // exact int32 sums (|q . xq| < 32 * 15 * 32767) for columns 0-7, 8-15
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < R; ++r) ilo[s][r] = ihi[s][r] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 + 32 * c));
      const __m256i v0 = _mm256_and_si256(raw, nibble), v1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
      // 16-bit lanes (q[k][j], q[k+1][j]) for inputs k = 4c (w0) and 4c + 2 (w1), columns 0-7 / 8-15
      const __m256i w0lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v0));
      const __m256i w0hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v0, 1));
      const __m256i w1lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v1));
      const __m256i w1hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v1, 1));
      for (int r = 0; r < R; ++r) {
        const int16_t* xq = x.q + (r0 + r) * x.K + b * BLOCK + 4 * c;
        const __m256i x0 = pair(xq), x1 = pair(xq + 2);
#if GEARSHIFT_VNNI
        ilo[0][r] = dpwssd(ilo[0][r], w0lo, x0);
        ihi[0][r] = dpwssd(ihi[0][r], w0hi, x0);
        ilo[S - 1][r] = dpwssd(ilo[S - 1][r], w1lo, x1);
        ihi[S - 1][r] = dpwssd(ihi[S - 1][r], w1hi, x1);
#else
        ilo[0][r] = _mm256_add_epi32(ilo[0][r], _mm256_add_epi32(_mm256_madd_epi16(w0lo, x0), _mm256_madd_epi16(w1lo, x1)));
        ihi[0][r] = _mm256_add_epi32(ihi[0][r], _mm256_add_epi32(_mm256_madd_epi16(w0hi, x0), _mm256_madd_epi16(w1hi, x1)));
#endif
      }
    }
    const __m256 dlo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m256 dhi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
    const __m256 mlo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32)));
    const __m256 mhi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 48)));
    for (int r = 0; r < R; ++r) {
      __m256i il = ilo[0][r], ih = ihi[0][r];
      if (S == 2) il = _mm256_add_epi32(il, ilo[1][r]), ih = _mm256_add_epi32(ih, ihi[1][r]);
      const __m256 dx = _mm256_set1_ps(x.dx[(r0 + r) * nb + b]), xs = _mm256_set1_ps(x.xs[(r0 + r) * nb + b]);
      lo[r] = _mm256_fmadd_ps(mlo, xs, _mm256_fmadd_ps(_mm256_mul_ps(dlo, dx), _mm256_cvtepi32_ps(il), lo[r]));
      hi[r] = _mm256_fmadd_ps(mhi, xs, _mm256_fmadd_ps(_mm256_mul_ps(dhi, dx), _mm256_cvtepi32_ps(ih), hi[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + (r0 + r) * N + t * Q4_COLS, lo[r]);
    _mm256_storeu_ps(y + (r0 + r) * N + t * Q4_COLS + 8, hi[r]);
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
  auto xq = at::empty({M, K}, x.options().dtype(at::kShort));
  auto scales = at::empty({2, M, nb}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int16_t>(), scales[0].data_ptr<float>(),
                scales[1].data_ptr<float>());
  const QuantRows rows{xq.data_ptr<int16_t>(), scales[0].data_ptr<float>(), scales[1].data_ptr<float>(), K, nb};
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
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int16_t>(), scales[0].data_ptr<float>(),
                scales[1].data_ptr<float>());
  const QuantRows rows{xq.data_ptr<int16_t>(), scales[0].data_ptr<float>(), scales[1].data_ptr<float>(), K, nb};
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
