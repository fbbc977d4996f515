// AVX-512 NF4 kernel of row_norm.h. A tile of kNf4NormRows rows x 32 columns: each row's run decoded
// from its 16 packed bytes into its even and odd columns (code[nibble] * absmax in fp32, exactly
// nf4_math.h's decode), then per group of 4 ranks the group's packed A vectors (even and odd
// columns, in the decode's order) loaded once and each row's coefficient broadcast into the two FMAs
// of its halves, then the squares into the row's accumulator. Registers: 8 value halves + 4
// accumulators + 8 A vectors + the code table.
#include <algorithm>
#include <cmath>

#include "dora/cpu/row_norm.h"
#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace dora {
namespace cpu {
namespace {

using nf4::cpu::avx512::decode32;
using nf4::cpu::avx512::load_bytes16;

constexpr int kRankStep = 4;
// Each row's packed bytes are fetched kPrefetchAhead columns ahead, one line (128 columns) per step.
constexpr int64_t kPrefetchAhead = 2048;

}  // namespace

void pack_nf4_norm_a(const float* A, int64_t r, int64_t cols, float* Ap) {
  const int64_t rp = norm_rank_padded(r);
  for (int64_t k = 0; k < cols; k += 32, Ap += rp * 32) {
    for (int64_t rr = 0; rr < rp; ++rr) {
      float* dst = Ap + rr * 32;
      for (int64_t l = 0; l < 16; ++l) {
        dst[l] = rr < r ? A[rr * cols + k + 2 * l] : 0.0f;
        dst[16 + l] = rr < r ? A[rr * cols + k + 2 * l + 1] : 0.0f;
      }
    }
  }
}

PEFTX_AVX512 void nf4_row_norm_rows(const nf4::cpu::Weight4& w, int64_t o0, int64_t nrows, const float* Ap,
                                    int64_t r, const float* c, float* norm) {
  if (nrows <= 0) return;
  constexpr int kR = static_cast<int>(kNf4NormRows);
  const int64_t cols = w.cols, rp = norm_rank_padded(r);
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const __m512 code = _mm512_loadu_ps(w.code);
  // Rows past nrows repeat the last one (their sums are dropped): the tile has no row predicates.
  int64_t j[kR];  // element index of the row's current run
  const float* cr[kR];
  for (int i = 0; i < kR; ++i) {
    const int64_t row = std::min<int64_t>(i, nrows - 1);
    j[i] = (o0 + row) * cols;
    cr[i] = c + row * rp;
  }
  const int64_t total = w.rows * cols;
  __m512 acc[kR];
#pragma GCC unroll 4
  for (int i = 0; i < kR; ++i) acc[i] = _mm512_setzero_ps();
  const float* ac = Ap;  // this run's rank vectors
  for (int64_t k = 0; k < cols; k += 32, ac += rp * 32) {
    __m512 ve[kR], vo[kR];
#pragma GCC unroll 4
    for (int i = 0; i < kR; ++i) {
      const int64_t e = j[i] + k;
      if (k % 128 == 0 && e + kPrefetchAhead < total)
        _mm_prefetch(reinterpret_cast<const char*>(w.packed + (e + kPrefetchAhead) / 2), _MM_HINT_T0);
      __m512 hi, lo;
      decode32(load_bytes16(w.packed + e / 2), code, hi, lo);
      const __m512 s = _mm512_set1_ps(w.absmax[e >> shift]);
      ve[i] = _mm512_mul_ps(hi, s);
      vo[i] = _mm512_mul_ps(lo, s);
    }
    for (int64_t g = 0; g < rp; g += kRankStep) {
      __m512 ae[kRankStep], ao[kRankStep];
#pragma GCC unroll 4
      for (int q = 0; q < kRankStep; ++q) {
        ae[q] = _mm512_loadu_ps(ac + (g + q) * 32);
        ao[q] = _mm512_loadu_ps(ac + (g + q) * 32 + 16);
      }
#pragma GCC unroll 4
      for (int q = 0; q < kRankStep; ++q)
#pragma GCC unroll 4
        for (int i = 0; i < kR; ++i) {
          const __m512 cb = _mm512_set1_ps(cr[i][g + q]);
          ve[i] = _mm512_fmadd_ps(cb, ae[q], ve[i]);
          vo[i] = _mm512_fmadd_ps(cb, ao[q], vo[i]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < kR; ++i) acc[i] = _mm512_fmadd_ps(vo[i], vo[i], _mm512_fmadd_ps(ve[i], ve[i], acc[i]));
  }
  for (int64_t i = 0; i < nrows; ++i) norm[i] = std::sqrt(_mm512_reduce_add_ps(acc[i]));
}

}  // namespace cpu
}  // namespace dora
}  // namespace peftx
