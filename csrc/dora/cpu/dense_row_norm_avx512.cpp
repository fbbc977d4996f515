// AVX-512 kernel of dense_row_norm.h. A tile of kNormRows rows x 16 columns: the rows' W values
// (widened to fp32), then per group of kNormRankGroup ranks the group's A vectors loaded once and
// each row's coefficients broadcast from memory into one FMA per rank, then one FMA of the square
// into the row's accumulator. Registers: 8 values + 8 accumulators + 8 A vectors. Each A vector
// feeds 8 rows, so A ([r, cols] fp32, from L2) is read once per 8 rows of W.
#include "dora/cpu/dense_row_norm.h"

#include <algorithm>
#include <cmath>

#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace dora {
namespace cpu {
namespace {

PEFTX_AVX512_INLINE __m512 load_w(const float* p, __mmask16 in) { return _mm512_maskz_loadu_ps(in, p); }
PEFTX_AVX512_INLINE __m512 load_w(const bf16_t* p, __mmask16 in) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
PEFTX_AVX512_INLINE __m512 load_w(const f16_t* p, __mmask16 in) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, p));
}

template <typename T>
PEFTX_AVX512 void rows_t(const T* W, int64_t nrows, int64_t cols, const float* A, int64_t r, const float* c,
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
  for (int64_t k = 0; k < cols; k += 16) {
    const __mmask16 in = cols - k >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (cols - k)) - 1u);
    __m512 v[kR];
#pragma GCC unroll 8
    for (int i = 0; i < kR; ++i) v[i] = load_w(w[i] + k, in);
    for (int64_t g = 0; g < r; g += kG) {
      __m512 a[kG];
#pragma GCC unroll 8
      for (int q = 0; q < kG; ++q) {
        // Ranks past r load nothing (an all-zero mask) and their coefficients are 0.
        const __mmask16 m = g + q < r ? in : __mmask16{0};
        a[q] = _mm512_maskz_loadu_ps(m, A + std::min<int64_t>(g + q, r - 1) * cols + k);
      }
#pragma GCC unroll 8
      for (int i = 0; i < kR; ++i)
#pragma GCC unroll 8
        for (int q = 0; q < kG; ++q) v[i] = _mm512_fmadd_ps(_mm512_set1_ps(cr[i][g + q]), a[q], v[i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < kR; ++i) acc[i] = _mm512_fmadd_ps(v[i], v[i], acc[i]);
  }
  for (int64_t i = 0; i < nrows; ++i) norm[i] = std::sqrt(_mm512_reduce_add_ps(acc[i]));
}

}  // namespace

void dense_row_norm_rows(DenseDt dt, const void* W, int64_t nrows, int64_t cols, const float* A, int64_t r,
                         const float* c, float* norm) {
  if (nrows <= 0) return;
  switch (dt) {
    case DenseDt::kF32:
      return rows_t(static_cast<const float*>(W), nrows, cols, A, r, c, norm);
    case DenseDt::kF16:
      return rows_t(static_cast<const f16_t*>(W), nrows, cols, A, r, c, norm);
    case DenseDt::kBF16:
      return rows_t(static_cast<const bf16_t*>(W), nrows, cols, A, r, c, norm);
  }
}

}  // namespace cpu
}  // namespace dora
}  // namespace peftx
