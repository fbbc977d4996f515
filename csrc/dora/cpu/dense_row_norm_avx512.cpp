// AVX-512 dense kernel of row_norm.h. A tile of kNormRows rows x 16 columns: the rows' W values
// (widened to fp32), then per group of kNormRankGroup ranks the group's A vectors loaded once (packed
// per chunk: consecutive vectors, no address arithmetic or masks) and each row's coefficients
// broadcast from memory into one FMA per rank, then one FMA of the square into the row's accumulator.
// Registers: 8 values + 8 accumulators + 8 A vectors. Each A vector feeds 8 rows, so the packed A
// (from L2) is read once per 8 rows of W.
#include "dora/cpu/row_norm.h"

#include <algorithm>
#include <cmath>

#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace dora {
namespace cpu {
namespace {

// The 8 rows' W streams (K elements apart) are fetched kPrefetchAhead elements ahead, one line per
// row every kPrefetchStep elements (64 bytes of the widest dtype: 16 fp32).
constexpr int64_t kPrefetchAhead = 1024, kPrefetchStep = 16;

PEFTX_AVX512_INLINE __m512 load_w(const float* p, __mmask16 in) { return _mm512_maskz_loadu_ps(in, p); }
PEFTX_AVX512_INLINE __m512 load_w(const bf16_t* p, __mmask16 in) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
PEFTX_AVX512_INLINE __m512 load_w(const f16_t* p, __mmask16 in) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, p));
}

template <typename T>
PEFTX_AVX512 void rows_t(const T* W, int64_t nrows, int64_t cols, const float* Ap, int64_t r, const float* c,
                         float* norm) {
  constexpr int kR = static_cast<int>(kNormRows), kG = static_cast<int>(kNormRankGroup);
  const int64_t rp = norm_rank_padded(r);
  // Rows past nrows repeat the last one (their sums are dropped): the tile has no row predicates.
  const T* w[kR];
  const float* cr[kR];
  for (int i = 0; i < kR; ++i) {
    const int64_t row = std::min<int64_t>(i, nrows - 1);
    w[i] = W + row * cols;
    cr[i] = c + row * rp;
  }
  __m512 acc[kR];
#pragma GCC unroll 8
  for (int i = 0; i < kR; ++i) acc[i] = _mm512_setzero_ps();
  const float* ac = Ap;  // this chunk's rank vectors
  for (int64_t k = 0; k < cols; k += 16, ac += rp * 16) {
    const __mmask16 in = cols - k >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (cols - k)) - 1u);
    if (k % kPrefetchStep == 0) {
#pragma GCC unroll 8
      for (int i = 0; i < kR; ++i) _mm_prefetch(reinterpret_cast<const char*>(w[i] + k + kPrefetchAhead), _MM_HINT_T0);
    }
    __m512 v[kR];
#pragma GCC unroll 8
    for (int i = 0; i < kR; ++i) v[i] = load_w(w[i] + k, in);
    for (int64_t g = 0; g < rp; g += kG) {
      __m512 a[kG];
#pragma GCC unroll 8
      for (int q = 0; q < kG; ++q) a[q] = _mm512_loadu_ps(ac + (g + q) * 16);
      // Rank-major: consecutive FMAs update different rows, 8 independent chains.
#pragma GCC unroll 8
      for (int q = 0; q < kG; ++q)
#pragma GCC unroll 8
        for (int i = 0; i < kR; ++i) v[i] = _mm512_fmadd_ps(_mm512_set1_ps(cr[i][g + q]), a[q], v[i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < kR; ++i) acc[i] = _mm512_fmadd_ps(v[i], v[i], acc[i]);
  }
  for (int64_t i = 0; i < nrows; ++i) norm[i] = std::sqrt(_mm512_reduce_add_ps(acc[i]));
}

}  // namespace

void pack_norm_a(const float* A, int64_t r, int64_t cols, float* Ap) {
  const int64_t rp = norm_rank_padded(r);
  for (int64_t k = 0; k < cols; k += 16, Ap += rp * 16) {
    const int64_t n = std::min<int64_t>(16, cols - k);
    for (int64_t rr = 0; rr < rp; ++rr) {
      float* dst = Ap + rr * 16;
      for (int64_t l = 0; l < 16; ++l) dst[l] = rr < r && l < n ? A[rr * cols + k + l] : 0.0f;
    }
  }
}

void dense_row_norm_rows(DenseDt dt, const void* W, int64_t nrows, int64_t cols, const float* Ap, int64_t r,
                         const float* c, float* norm) {
  if (nrows <= 0) return;
  switch (dt) {
    case DenseDt::kF32:
      return rows_t(static_cast<const float*>(W), nrows, cols, Ap, r, c, norm);
    case DenseDt::kF16:
      return rows_t(static_cast<const f16_t*>(W), nrows, cols, Ap, r, c, norm);
    case DenseDt::kBF16:
      return rows_t(static_cast<const bf16_t*>(W), nrows, cols, Ap, r, c, norm);
  }
}

}  // namespace cpu
}  // namespace dora
}  // namespace peftx
