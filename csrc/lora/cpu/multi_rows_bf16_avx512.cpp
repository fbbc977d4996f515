// AVX-512 BF16 kernel of multi_rows_bf16.h. u = x A^T: lanes over k, 4 rows x 4 ranks of
// accumulators (each load feeds 4 dot products), reduced across lanes. y += s u B^T: lanes over
// the outputs n, pairs of ranks per vdpbf16ps against (u[2j], u[2j + 1]) broadcast, 4 rows x 32
// outputs of accumulators; then y = bf16(y + s * acc) (one multiply, one add, one rounding).
#include "lora/cpu/multi_rows_bf16.h"

#include <algorithm>

#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace lora {
namespace cpu {
namespace {

constexpr int kMaxRows = 4;

// u[i * R + r0 + j] = sum_k x[rows[i], k] A[r0 + j, k] for i < 4 (missing rows repeat row 0), j < RB.
template <int RB>
PEFTX_AVX512BF16 void shrink(const uint16_t* const* xr, int64_t K, const uint16_t* A, int64_t R, int64_t r0,
                             float* u) {
  __m512 acc[kMaxRows][RB];
  for (int i = 0; i < kMaxRows; ++i)
    for (int j = 0; j < RB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh av[RB];
    for (int j = 0; j < RB; ++j) av[j] = (__m512bh)_mm512_loadu_si512(A + (r0 + j) * K + k);
    for (int i = 0; i < kMaxRows; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr[i] + k);
      for (int j = 0; j < RB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av[j], xv);
    }
  }
  for (int i = 0; i < kMaxRows; ++i)
    for (int j = 0; j < RB; ++j) u[i * R + r0 + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// y[rows[i], n .. n + 16 NV) = bf16(base + s * sum_j (u[i, 2 j], u[i, 2 j + 1]) . BTp[j][n ..]) for i < nrows.
template <int NV>
PEFTX_AVX512BF16 void expand(const uint32_t* BTp, int64_t R2, int64_t N, int64_t n, const uint32_t (*up)[32],
                             int nrows, const int64_t* rows, __m512 sv, const uint16_t* base, uint16_t* y) {
  __m512 acc[kMaxRows][NV];
  for (int i = 0; i < kMaxRows; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < R2; ++j) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(BTp + j * N + n + 16 * v);
    for (int i = 0; i < kMaxRows; ++i) {
      const __m512bh uv = (__m512bh)_mm512_set1_epi32(static_cast<int>(up[i][j]));
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], b[v], uv);
    }
  }
  for (int i = 0; i < nrows; ++i) {
    uint16_t* yr = y + rows[i] * N + n;
    const uint16_t* br = base + rows[i] * N + n;
    for (int v = 0; v < NV; ++v) {
      const __m512i old = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(br + 16 * v)));
      const __m512 sum = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(old, 16)), _mm512_mul_ps(sv, acc[i][v]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + 16 * v),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(nf4::cpu::avx512::bf16_high(sum), 16)));
    }
  }
}

}  // namespace

PEFTX_AVX512BF16 void multi_rows_bf16(const uint16_t* x, int64_t K, const int64_t* rows, int nrows,
                                      const uint16_t* A, int64_t R, const uint32_t* BTp, int64_t N, float s,
                                      const uint16_t* base, uint16_t* y) {
  const uint16_t* xr[kMaxRows];
  for (int i = 0; i < kMaxRows; ++i) xr[i] = x + rows[i < nrows ? i : 0] * K;
  float u[kMaxRows * 64];
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    switch (std::min<int64_t>(4, R - r0)) {
      case 1: shrink<1>(xr, K, A, R, r0, u); break;
      case 2: shrink<2>(xr, K, A, R, r0, u); break;
      case 3: shrink<3>(xr, K, A, R, r0, u); break;
      default: shrink<4>(xr, K, A, R, r0, u); break;
    }
  }
  // (u[i, 2 j], u[i, 2 j + 1]) as a bf16 pair (rounded as bf16_from_float; 0 past R).
  const int64_t R2 = (R + 1) / 2;
  uint32_t up[kMaxRows][32];
  for (int i = 0; i < kMaxRows; ++i)
    for (int64_t j = 0; j < R2; ++j) {
      const uint32_t lo = bf16_from_float(u[i * R + 2 * j]).bits;
      const uint32_t hi = 2 * j + 1 < R ? bf16_from_float(u[i * R + 2 * j + 1]).bits : 0u;
      up[i][j] = lo | (hi << 16);
    }
  const __m512 sv = _mm512_set1_ps(s);
  int64_t n = 0;
  for (; n + 64 <= N; n += 64) expand<4>(BTp, R2, N, n, up, nrows, rows, sv, base, y);
  for (; n < N; n += 32) expand<2>(BTp, R2, N, n, up, nrows, rows, sv, base, y);
}

}  // namespace cpu
}  // namespace lora
}  // namespace peftx
