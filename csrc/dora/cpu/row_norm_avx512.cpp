// AVX-512 kernels of row_norm.h. A tile of kNormRows rows x 32 columns: each row's run as two fp32
// halves (dense: loaded and widened; NF4: decoded from 16 bytes, code[nibble] * absmax exactly as
// nf4_math.h's decode), then per group of kNormRankGroup ranks the group's packed A halves loaded
// once and each row's coefficient broadcast into the FMAs of both halves, then the squares into the
// row's accumulator. Registers: 8 value halves + 4 accumulators + 8 A halves (+ the NF4 code table).
#include "dora/cpu/row_norm.h"

#include <algorithm>
#include <cmath>

#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace dora {
namespace cpu {
namespace {

using nf4::cpu::avx512::decode32;
using nf4::cpu::avx512::load_bytes16;

// Each row's W is fetched kPrefetchAhead elements ahead of the tile: the 4 rows' streams are a row
// apart, which the hardware prefetcher follows poorly.
constexpr int64_t kPrefetchAhead = 2048;

PEFTX_AVX512_INLINE __m512 load_w(const float* p, __mmask16 in) { return _mm512_maskz_loadu_ps(in, p); }
PEFTX_AVX512_INLINE __m512 load_w(const bf16_t* p, __mmask16 in) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
PEFTX_AVX512_INLINE __m512 load_w(const f16_t* p, __mmask16 in) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, p));
}

PEFTX_AVX512_INLINE __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16{0xFFFF} : n <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << n) - 1u);
}

// The tile over cols columns: run(i, k, lo, hi) writes row i's run at column k (the two halves),
// prefetch(i, k) fetches ahead (called per run); Ap / c / norm as in row_norm.h.
template <typename Run, typename Prefetch>
PEFTX_AVX512_INLINE void tile(int64_t nrows, int64_t cols, const float* Ap, int64_t r, const float* c, float* norm,
                              Run&& run, Prefetch&& prefetch) {
  constexpr int kR = static_cast<int>(kNormRows), kG = static_cast<int>(kNormRankGroup);
  const int64_t rp = norm_rank_padded(r);
  const float* cr[kR];
  for (int i = 0; i < kR; ++i) cr[i] = c + std::min<int64_t>(i, nrows - 1) * rp;
  __m512 acc[kR];
#pragma GCC unroll 4
  for (int i = 0; i < kR; ++i) acc[i] = _mm512_setzero_ps();
  const float* ac = Ap;  // this run's rank vectors
  for (int64_t k = 0; k < cols; k += 32, ac += rp * 32) {
    __m512 v0[kR], v1[kR];
#pragma GCC unroll 4
    for (int i = 0; i < kR; ++i) {
      prefetch(i, k);
      run(i, k, v0[i], v1[i]);
    }
    for (int64_t g = 0; g < rp; g += kG) {
      __m512 a0[kG], a1[kG];
#pragma GCC unroll 4
      for (int q = 0; q < kG; ++q) {
        a0[q] = _mm512_loadu_ps(ac + (g + q) * 32);
        a1[q] = _mm512_loadu_ps(ac + (g + q) * 32 + 16);
      }
      // Rank-major: consecutive FMAs update different rows.
#pragma GCC unroll 4
      for (int q = 0; q < kG; ++q)
#pragma GCC unroll 4
        for (int i = 0; i < kR; ++i) {
          const __m512 cb = _mm512_set1_ps(cr[i][g + q]);
          v0[i] = _mm512_fmadd_ps(cb, a0[q], v0[i]);
          v1[i] = _mm512_fmadd_ps(cb, a1[q], v1[i]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < kR; ++i) acc[i] = _mm512_fmadd_ps(v1[i], v1[i], _mm512_fmadd_ps(v0[i], v0[i], acc[i]));
  }
  for (int64_t i = 0; i < nrows; ++i) norm[i] = std::sqrt(_mm512_reduce_add_ps(acc[i]));
}

template <typename T>
PEFTX_AVX512 void dense_rows(const T* W, int64_t nrows, int64_t cols, const float* Ap, int64_t r, const float* c,
                             float* norm) {
  // Rows past nrows repeat the last one (their sums are dropped): the tile has no row predicates.
  const T* w[kNormRows];
  for (int64_t i = 0; i < kNormRows; ++i) w[i] = W + std::min<int64_t>(i, nrows - 1) * cols;
  tile(
      nrows, cols, Ap, r, c, norm,
      [&](int i, int64_t k, __m512& lo, __m512& hi) PEFTX_AVX512 {
        lo = load_w(w[i] + k, lanes(cols - k));
        hi = load_w(w[i] + k + 16, lanes(cols - k - 16));
      },
      [&](int i, int64_t k) PEFTX_AVX512 {
        // The run's bytes ahead: one line (bf16 / f16) or two (fp32).
        const char* p = reinterpret_cast<const char*>(w[i] + k + kPrefetchAhead);
        _mm_prefetch(p, _MM_HINT_T0);
        if constexpr (sizeof(T) == 4) _mm_prefetch(p + 64, _MM_HINT_T0);
      });
}

}  // namespace

void pack_norm_a(const float* A, int64_t r, int64_t cols, bool even_odd, float* Ap) {
  const int64_t rp = norm_rank_padded(r);
  for (int64_t k = 0; k < cols; k += 32, Ap += rp * 32) {
    for (int64_t rr = 0; rr < rp; ++rr) {
      float* dst = Ap + rr * 32;
      for (int64_t l = 0; l < 32; ++l) {
        const int64_t col = k + (even_odd ? (l < 16 ? 2 * l : 2 * (l - 16) + 1) : l);
        dst[l] = rr < r && col < cols ? A[rr * cols + col] : 0.0f;
      }
    }
  }
}

void dense_row_norm_rows(DenseDt dt, const void* W, int64_t nrows, int64_t cols, const float* Ap, int64_t r,
                         const float* c, float* norm) {
  if (nrows <= 0) return;
  switch (dt) {
    case DenseDt::kF32:
      return dense_rows(static_cast<const float*>(W), nrows, cols, Ap, r, c, norm);
    case DenseDt::kF16:
      return dense_rows(static_cast<const f16_t*>(W), nrows, cols, Ap, r, c, norm);
    case DenseDt::kBF16:
      return dense_rows(static_cast<const bf16_t*>(W), nrows, cols, Ap, r, c, norm);
  }
}

PEFTX_AVX512 void nf4_row_norm_rows(const nf4::cpu::Weight4& w, int64_t o0, int64_t nrows, const float* Ap,
                                    int64_t r, const float* c, float* norm) {
  if (nrows <= 0) return;
  const int64_t cols = w.cols, total = w.rows * cols;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const __m512 code = _mm512_loadu_ps(w.code);
  int64_t j[kNormRows];  // element index of each row's start (rows past nrows repeat the last)
  for (int64_t i = 0; i < kNormRows; ++i) j[i] = (o0 + std::min<int64_t>(i, nrows - 1)) * cols;
  tile(
      nrows, cols, Ap, r, c, norm,
      [&](int i, int64_t k, __m512& even, __m512& odd) PEFTX_AVX512 {
        const int64_t e = j[i] + k;
        __m512 hi, lo;
        decode32(load_bytes16(w.packed + e / 2), code, hi, lo);
        const __m512 s = _mm512_set1_ps(w.absmax[e >> shift]);
        even = _mm512_mul_ps(hi, s);
        odd = _mm512_mul_ps(lo, s);
      },
      [&](int i, int64_t k) PEFTX_AVX512 {
        if (k % 128 != 0) return;  // a line of bytes per 128 columns
        const int64_t e = j[i] + k + kPrefetchAhead;
        if (e < total) _mm_prefetch(reinterpret_cast<const char*>(w.packed + e / 2), _MM_HINT_T0);
      });
}

}  // namespace cpu
}  // namespace dora
}  // namespace peftx
