// AVX-512 fp32 kernels of rank_f32.h, laid out as rank_bf16_avx512.cpp's (see there for why):
// shrink: lanes over k; 4 rows x up to 4 ranks of accumulators, reduced across lanes at the end.
// expand: lanes over the outputs, 4 rows x 64 outputs per tile, u broadcast; the next row group's
// y prefetched a tile at a time.
// adjoint: per column chunk, a pass along the row pairs (x and dx read front to back, the row
// pair kPrefetchPairs ahead fetched a line per group) storing xd contiguously per row (pk) and adding
// dx's LoRA term (A's chunk in registers per group, gBs broadcast); then each 16-column strip of pk
// gives dA, one accumulator per rank (RV <= 16 registers for the whole strip). In the dB pass over
// g, g B rides along: lanes over the ranks, g's elements broadcast from the row just loaded.
// Every loop over accumulators has a compile-time trip count and is unrolled.
#include "lora/cpu/rank_f32.h"

#include <algorithm>

#include "common/cpu_isa.h"
#include "lora/cpu/adjoint_stores_avx512.h"
#include "lora/dropout_cpu.h"
#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace lora {
namespace cpu {
namespace {

constexpr int kRows = 4;
constexpr int64_t kPrefetchPairs = 2;
// A's row for the ranks past R in adjoint_rows (their gBs columns are 0 too).
alignas(64) constexpr float kZeroRow[kMaxAdjointColsF32] = {};

PEFTX_AVX512_INLINE __mmask16 lanes16(int64_t n) {
  return n >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << n) - 1u);
}

// The keep bits of the 16 elements at offset i (i % 16 == 0) of row r (dropout_keep_bits' layout).
PEFTX_AVX512_INLINE __mmask16 keep16(const uint64_t* bits, int64_t words, int r, int64_t i) {
  return static_cast<__mmask16>(bits[r * words + (i >> 6)] >> (i & 63));
}

// acc[i][j] += xr[i][k .. k + 16) . A[r0 + j, k .. k + 16) (lanes outside `in` read as 0).
template <int RB, bool kMasked>
PEFTX_AVX512_INLINE void shrink_step(__m512 (&acc)[kRows][RB], const float* const* xr, const float* A, int64_t K,
                                     int64_t r0, int64_t k, __mmask16 in) {
  __m512 av[RB];
#pragma GCC unroll 16
  for (int j = 0; j < RB; ++j) {
    const float* a = A + (r0 + j) * K + k;
    av[j] = kMasked ? _mm512_maskz_loadu_ps(in, a) : _mm512_loadu_ps(a);
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
    const __m512 xv = kMasked ? _mm512_maskz_loadu_ps(in, xr[i] + k) : _mm512_loadu_ps(xr[i] + k);
#pragma GCC unroll 16
    for (int j = 0; j < RB; ++j) acc[i][j] = _mm512_fmadd_ps(av[j], xv, acc[i][j]);
  }
}

// u[i * R + r0 + j] = sum_k xr[i][k] A[r0 + j, k] for i < nrows, j < RB.
template <int RB>
PEFTX_AVX512 void shrink_tile(const float* const* xr, int nrows, int64_t K, const float* A, int64_t R, int64_t r0,
                              float* u) {
  __m512 acc[kRows][RB];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < RB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) shrink_step<RB, false>(acc, xr, A, K, r0, k, 0);
  if (k < K) shrink_step<RB, true>(acc, xr, A, K, r0, k, lanes16(K - k));
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
    if (i >= nrows) break;
#pragma GCC unroll 16
    for (int j = 0; j < RB; ++j) u[i * R + r0 + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

// xd of `nrows` rows of x [., K] into buf [nrows, K] from their keep bits: fp32(x * scale) or 0, as
// dropout_rows.
PEFTX_AVX512 void drop_rows_f32(const float* x, int nrows, int64_t K, const uint64_t* bits, int64_t words, float scale,
                                float* buf) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int r = 0; r < nrows; ++r) {
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 in = lanes16(K - k);
      const __mmask16 keep = in & keep16(bits, words, r, k);
      _mm512_mask_storeu_ps(buf + r * K + k, in, _mm512_maskz_mul_ps(keep, _mm512_maskz_loadu_ps(keep, x + r * K + k), sv));
    }
  }
}

// y[m + i, n .. n + 16 NV) += s * sum_j u[m + i, j] BT[j, n ..] for i < nrows (ur[i]: u's rows, the
// missing ones repeating row 0); the last vector takes the lanes `tail`. pf: the next row group's y.
template <int NV>
PEFTX_AVX512 void expand_tile(const float* const* ur, int nrows, int64_t R, const float* BT, int64_t N, int64_t n,
                              __mmask16 tail, __m512 sv, float* y, const float* pf) {
  if (pf != nullptr) {
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) __builtin_prefetch(pf + i * N + n + 16 * v, 1);
  }
  __m512 acc[kRows][NV];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < R; ++j) {
    __m512 b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? tail : __mmask16{0xFFFF}, BT + j * N + n + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const __m512 uv = _mm512_set1_ps(ur[i][j]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(b[v], uv, acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {  // compile-time i: a run-time bound would put acc in memory
    if (i >= nrows) break;
    float* yr = y + i * N + n;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? tail : __mmask16{0xFFFF};
      _mm512_mask_storeu_ps(yr + 16 * v, m, _mm512_fmadd_ps(sv, acc[i][v], _mm512_maskz_loadu_ps(m, yr + 16 * v)));
    }
  }
}

// The row-pair pass of adjoint_f32 over its column chunk [k0, k1): xd of each row to pk[m * ldp +
// (k - k0)], and with kDx, dx's LoRA term added where kept; with kGb (the dB pass over g: no
// dropout, no dx), each row's g B partial sums into gpart->acc. arow[j]: A's row j from column k0
// (a zero row for j >= R).
template <int RV, bool kDrop, bool kDx, bool kGb>
PEFTX_AVX512 void adjoint_rows(const Dropout* d, const float* x, int64_t M, int64_t K, int64_t k0, int64_t k1,
                               uint64_t* bits, int64_t words, const float* gBs, const float* const* arow, float* dx,
                               float* pk, int64_t ldp, const GbsPartialF32* gpart) {
  static_assert(!kGb || (!kDrop && !kDx), "the g B partials ride on the plain pass");
  const int64_t groups = (k1 - k0 + 15) / 16;
  const __m512 scale = _mm512_set1_ps(kDrop ? d->scale : 1.0f);
  for (int64_t m = 0; m < M; m += 2) {
    const int rows = m + 1 < M ? 2 : 1;
    if constexpr (kDrop) dropout_keep_bits(CpuIsa::avx512, *d, static_cast<uint64_t>(m * K + k0), K, rows, k1 - k0, bits);
    __m512 gacc[2][kGb ? kGbsSplit : 1];
    if constexpr (kGb) {
#pragma GCC unroll 2
      for (int r = 0; r < 2; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < kGbsSplit; ++c) gacc[r][c] = _mm512_setzero_ps();
    }
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t k = k0 + 16 * gi;
      const __mmask16 in = lanes16(k1 - k);
      // The rows' segments are short runs K apart, which the hardware prefetchers do not run ahead
      // of: fetch the line of this group of the row pair kPrefetchPairs ahead.
#pragma GCC unroll 2
      for (int r = 0; r < 2; ++r) {
        const int64_t at = std::min(M - 1, m + 2 * kPrefetchPairs + r) * K + k;
        __builtin_prefetch(x + at);
        if constexpr (kDx) __builtin_prefetch(dx + at, 1);
      }
      __mmask16 keep[2] = {in, rows == 2 ? in : __mmask16{0}};
      if constexpr (kDrop) {
#pragma GCC unroll 2
        for (int r = 0; r < 2; ++r) keep[r] &= keep16(bits, words, r, k - k0);
      }
#pragma GCC unroll 2
      for (int r = 0; r < 2; ++r) {
        if (r >= rows) break;
        const float* xr = x + (m + r) * K + k;
        const __m512 xv = _mm512_maskz_loadu_ps(keep[r], xr);
        _mm512_storeu_ps(pk + (m + r) * ldp + 16 * gi, kDrop ? _mm512_mul_ps(xv, scale) : xv);
      }
      if constexpr (kGb) {
        // Column k + c against B's row k + c (16 ranks), for both rows: g's elements broadcast from L1.
        const int64_t kc = std::min<int64_t>(16, k1 - k);
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) {
          if (c >= kc) break;
          const __m512 b = _mm512_loadu_ps(gpart->Bq + (k + c) * 16);
#pragma GCC unroll 2
          for (int r = 0; r < 2; ++r) {
            const float* gp = x + (m + (r < rows ? r : 0)) * K + k + c;
            gacc[r][c % kGbsSplit] = _mm512_fmadd_ps(_mm512_set1_ps(*gp), b, gacc[r][c % kGbsSplit]);
          }
        }
      }
      if constexpr (kDx) {
        __m512 a[RV];
#pragma GCC unroll 16
        for (int j = 0; j < RV; ++j) a[j] = _mm512_maskz_loadu_ps(in, arow[j] + 16 * gi);
#pragma GCC unroll 2
        for (int r = 0; r < 2; ++r) {
          if (r >= rows) break;
          const float* g = gBs + (m + r) * RV;
          // Two partial sums: one chain of RV dependent FMAs would leave the pipes waiting.
          __m512 t2[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
#pragma GCC unroll 16
          for (int j = 0; j < RV; ++j) t2[j & 1] = _mm512_fmadd_ps(_mm512_set1_ps(g[j]), a[j], t2[j & 1]);
          float* dxr = dx + (m + r) * K + k;
          const __m512 sum = _mm512_fmadd_ps(_mm512_add_ps(t2[0], t2[1]), scale, _mm512_maskz_loadu_ps(keep[r], dxr));
          _mm512_mask_storeu_ps(dxr, keep[r], sum);
        }
      }
    }
    if constexpr (kGb) {
#pragma GCC unroll 2
      for (int r = 0; r < 2; ++r) {
        if (r >= rows) break;
        add_gb_partials(gpart->acc + (m + r) * 16, gacc[r]);
      }
    }
  }
}

// dA of the 16 columns at k (lanes `in`) from pk (rows ldp apart): acc[j] = sum_m xd[m, k + l] gBs[m, j].
template <int RV>
PEFTX_AVX512 void adjoint_strip(const float* pk, int64_t ldp, int64_t M, const float* gBs, int64_t R, int64_t K,
                                int64_t k, __mmask16 in, float* dA, bool dA_t) {
  __m512 acc[RV];
#pragma GCC unroll 16
  for (int j = 0; j < RV; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t m = 0; m < M; ++m) {
    const __m512 xv = _mm512_loadu_ps(pk + m * ldp);
    const float* g = gBs + m * RV;
#pragma GCC unroll 16
    for (int j = 0; j < RV; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(g[j]), xv, acc[j]);
  }
  store_dA(acc, 0, R, K, k, in, dA, dA_t);
}

template <int RV>
PEFTX_AVX512 void adjoint_chunk(const Dropout* d, const float* x, int64_t M, int64_t K, int64_t k0, int64_t k1,
                                uint64_t* bits, int64_t words, const float* gBs, const float* A, int64_t R, float* dA,
                                bool dA_t, float* dx, float* pk, const GbsPartialF32* gb) {
  const int64_t groups = (k1 - k0 + 15) / 16, ldp = 16 * groups;
  const float* arow[RV];
  for (int j = 0; j < RV; ++j) arow[j] = A != nullptr && j < R ? A + j * K + k0 : kZeroRow;
  if (d != nullptr && dx != nullptr) {
    adjoint_rows<RV, true, true, false>(d, x, M, K, k0, k1, bits, words, gBs, arow, dx, pk, ldp, gb);
  } else if (d != nullptr) {
    adjoint_rows<RV, true, false, false>(d, x, M, K, k0, k1, bits, words, gBs, arow, dx, pk, ldp, gb);
  } else if (dx != nullptr) {
    adjoint_rows<RV, false, true, false>(d, x, M, K, k0, k1, bits, words, gBs, arow, dx, pk, ldp, gb);
  } else if (gb != nullptr) {
    adjoint_rows<RV, false, false, true>(d, x, M, K, k0, k1, bits, words, gBs, arow, dx, pk, ldp, gb);
  } else {
    adjoint_rows<RV, false, false, false>(d, x, M, K, k0, k1, bits, words, gBs, arow, dx, pk, ldp, gb);
  }
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t k = k0 + 16 * gi;
    adjoint_strip<RV>(pk + 16 * gi, ldp, M, gBs, R, K, k, lanes16(k1 - k), dA, dA_t);
  }
}

}  // namespace

bool rank_f32_supported() { return cpu_isa() == CpuIsa::avx512; }

PEFTX_AVX512 void shrink_f32(const Dropout* d, const float* x, int64_t m0, int64_t m1, int64_t K, const float* A,
                             int64_t R, float* buf, uint64_t* bits, float* u) {
  const int64_t words = (K + 63) / 64;
  for (int64_t m = m0; m < m1; m += kRows) {
    const int nrows = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
    const float* rows = x + m * K;
    if (d != nullptr) {
      dropout_keep_bits(CpuIsa::avx512, *d, static_cast<uint64_t>(m * K), K, nrows, K, bits);
      drop_rows_f32(rows, nrows, K, bits, words, d->scale, buf);
      rows = buf;
    }
    const float* xr[kRows];
    for (int i = 0; i < kRows; ++i) xr[i] = rows + (i < nrows ? i : 0) * K;  // missing rows repeat row 0
    float* ur = u + m * R;
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      switch (std::min<int64_t>(4, R - r0)) {
        case 1: shrink_tile<1>(xr, nrows, K, A, R, r0, ur); break;
        case 2: shrink_tile<2>(xr, nrows, K, A, R, r0, ur); break;
        case 3: shrink_tile<3>(xr, nrows, K, A, R, r0, ur); break;
        default: shrink_tile<4>(xr, nrows, K, A, R, r0, ur); break;
      }
    }
  }
}

PEFTX_AVX512 void expand_f32(const float* u, int64_t m0, int64_t m1, int64_t R, const float* BT, int64_t N, float s,
                             float* y) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t m = m0; m < m1; m += kRows) {
    const int nrows = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
    const float* ur[kRows];
    for (int i = 0; i < kRows; ++i) ur[i] = u + (m + (i < nrows ? i : 0)) * R;
    float* yr = y + m * N;
    // The next row group's y, a tile's lines at a time (rows N apart: the hardware prefetchers
    // would start on each row only once its loads missed).
    const float* pf = m + 2 * kRows <= m1 ? yr + kRows * N : nullptr;
    int64_t n = 0;
    for (; n + 64 <= N; n += 64) expand_tile<4>(ur, nrows, R, BT, N, n, 0xFFFF, sv, yr, pf);
    for (; n < N; n += 16) expand_tile<1>(ur, nrows, R, BT, N, n, lanes16(N - n), sv, yr, nullptr);
  }
}

void transpose_f32(const float* in, int64_t rows, int64_t cols, float* out) {
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < cols; ++j) out[j * rows + n] = in[n * cols + j];
}

void pad_cols_f32(const float* in, int64_t rows, int64_t cols, float scale, int64_t width, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j) out[r * width + j] = j < cols ? in[r * cols + j] * scale : 0.0f;
}

PEFTX_AVX512 void gbs_from_partials_f32(const float* acc, int64_t parts, int64_t M, int64_t R, float s, float* gBs) {
  const __mmask16 lanes = lanes16(R);
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t m = 0; m < M; ++m) {
    __m512 sum = _mm512_loadu_ps(acc + m * 16);
    for (int64_t t = 1; t < parts; ++t) sum = _mm512_add_ps(sum, _mm512_loadu_ps(acc + (t * M + m) * 16));
    _mm512_mask_storeu_ps(gBs + m * R, lanes, _mm512_mul_ps(sum, sv));  // fp32(g B), then * s: mm, then mul_
  }
}

void adjoint_f32(const Dropout* d, const float* x, int64_t M, int64_t K, int64_t k0, int64_t k1, const float* gBs,
                 const float* A, int64_t R, float* dA, bool dA_t, float* dx, uint64_t* bits, float* pk,
                 const GbsPartialF32* gb) {
  const int64_t words = (k1 - k0 + 63) / 64;
  switch (rank_f32_padded(R)) {
    case 4: return adjoint_chunk<4>(d, x, M, K, k0, k1, bits, words, gBs, A, R, dA, dA_t, dx, pk, gb);
    case 8: return adjoint_chunk<8>(d, x, M, K, k0, k1, bits, words, gBs, A, R, dA, dA_t, dx, pk, gb);
    case 12: return adjoint_chunk<12>(d, x, M, K, k0, k1, bits, words, gBs, A, R, dA, dA_t, dx, pk, gb);
    default: return adjoint_chunk<16>(d, x, M, K, k0, k1, bits, words, gBs, A, R, dA, dA_t, dx, pk, gb);
  }
}

}  // namespace cpu
}  // namespace lora
}  // namespace peftx
