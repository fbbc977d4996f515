// The stores the rank-r kernels' adjoint passes share (rank_bf16_avx512.cpp, rank_f32_avx512.cpp): a
// 16-column strip's fp32 accumulators, one per rank, into dA or dA^T; and a row's g B partial sums.
#pragma once

#include <cstdint>

#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace lora {
namespace cpu {

// acc[j] (lanes `in`: columns k, k + 1, ...) stored as dA's rows j0 + j < R: dA [R, K], or with dA_t
// dA^T [K, R] (lane l of acc[j] to dA[(k + l) R + j0 + j]). Compile-time j only: a runtime bound on j
// would put the caller's accumulators in memory for its whole loop.
template <int J>
PEFTX_AVX512_INLINE void store_dA(const __m512 (&acc)[J], int j0, int64_t R, int64_t K, int64_t k, __mmask16 in,
                                  float* dA, bool dA_t) {
  if (dA_t) {
    const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(R)));
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j)
      if (j0 + j < R) _mm512_mask_i32scatter_ps(dA + k * R + j0 + j, in, at, acc[j], 4);
    return;
  }
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
    if (j0 + j < R) _mm512_mask_storeu_ps(dA + (j0 + j) * K + k, in, acc[j]);
}

// Partial sums per row of g B in the dB pass (a row's chain of dot products split in 4, so they do
// not wait on one accumulator's latency).
constexpr int kGbsSplit = 4;

// acc[0..16) += the sum of a row's kGbsSplit partial g B vectors.
PEFTX_AVX512_INLINE void add_gb_partials(float* acc, const __m512 (&part)[kGbsSplit]) {
  const __m512 sum = _mm512_add_ps(_mm512_add_ps(part[0], part[1]), _mm512_add_ps(part[2], part[3]));
  _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_loadu_ps(acc), sum));
}

}  // namespace cpu
}  // namespace lora
}  // namespace peftx
