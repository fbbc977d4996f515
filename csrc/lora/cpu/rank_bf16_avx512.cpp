// AVX-512 BF16 kernels of rank_bf16.h.
//
// shrink: lanes over k; 4 rows x up to 4 ranks of accumulators (each loaded vector feeds 4 dot
// products), reduced across lanes at the end. Under dropout the 4 rows are first dropped out into
// an L1 buffer by the vectorized elementwise pass (dropout_rows), which rounds them as the op's
// other paths do.
//
// adjoint: lanes over 16 columns k. dA needs a sum over the rows: vdpbf16ps takes rows in pairs,
// (xd[m, k], xd[m + 1, k]) against (gBs[m, j], gBs[m + 1, j]) broadcast, one accumulator per rank
// (R <= 16 registers for the whole column strip). The LoRA term of dx needs a sum over the ranks:
// A's strip is held as rank pairs (A[2 i, k], A[2 i + 1, k]) (R2 / 2 <= 8 registers) against
// (gBs[m, 2 i], gBs[m, 2 i + 1]) broadcast. The mask of the strip's rows is drawn once per column
// chunk into packed bits.
//
// gbs (s g B): lanes over the ranks, so B is read as pairs of rows (B[2 q, j], B[2 q + 1, j]) against
// (g[m, 2 q], g[m, 2 q + 1]) broadcast: no transpose of B and no reductions. expand (y += s u B^T):
// lanes over the outputs, rank pairs of B^T against (u[m, 2 i], u[m, 2 i + 1]) broadcast.
//
// Every loop over accumulators has a compile-time trip count and is unrolled (#pragma GCC unroll):
// GCC otherwise keeps such arrays in memory, a store per vdpbf16ps.
// The outputs y and dx are updated with one FMA and vcvtneps2bf16 (round to nearest even, NaN kept;
// it flushes fp32 subnormal results, below 1.2e-38, to zero).
#include "lora/cpu/rank_bf16.h"

#include <algorithm>

#include "common/cpu_isa.h"
#include "lora/dropout_cpu.h"
#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace lora {
namespace cpu {
namespace {

using nf4::cpu::avx512::bf16_high;

constexpr int kRows = 4;
constexpr int64_t kPrefetchRows = 8;

PEFTX_AVX512_INLINE __mmask32 lanes32(int64_t n) {
  return n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1u);
}
PEFTX_AVX512_INLINE __mmask16 lanes16(int64_t n) {
  return n >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 bf16 at p (lanes outside m read as 0) as fp32.
PEFTX_AVX512_INLINE __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// The bf16 of each lane of v in the low 16 bits of a dword (high bits 0), as bf16_from_float.
PEFTX_AVX512_INLINE __m512i bf16_low(__m512 v) { return _mm512_srli_epi32(bf16_high(v), 16); }

// acc[i][j] += xr[i][k .. k + 32) . A[r0 + j, k .. k + 32) (lanes outside `in` read as 0).
template <int RB, bool kMasked>
PEFTX_AVX512BF16 inline __attribute__((always_inline)) void shrink_step(__m512 (&acc)[kRows][RB],
                                                                       const uint16_t* const* xr, const uint16_t* A,
                                                                       int64_t K, int64_t r0, int64_t k, __mmask32 in) {
  __m512bh av[RB];
#pragma GCC unroll 16
  for (int j = 0; j < RB; ++j) {
    const uint16_t* a = A + (r0 + j) * K + k;
    av[j] = (__m512bh)(kMasked ? _mm512_maskz_loadu_epi16(in, a) : _mm512_loadu_si512(a));
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
    const __m512bh xv = (__m512bh)(kMasked ? _mm512_maskz_loadu_epi16(in, xr[i] + k) : _mm512_loadu_si512(xr[i] + k));
#pragma GCC unroll 16
    for (int j = 0; j < RB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av[j], xv);
  }
}

// u[i * R + r0 + j] = bf16(sum_k xr[i][k] A[r0 + j, k]) for i < nrows, j < RB.
template <int RB>
PEFTX_AVX512BF16 void shrink_tile(const uint16_t* const* xr, int nrows, int64_t K, const uint16_t* A, int64_t R,
                                  int64_t r0, uint16_t* u) {
  __m512 acc[kRows][RB];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < RB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) shrink_step<RB, false>(acc, xr, A, K, r0, k, 0);
  if (k < K) shrink_step<RB, true>(acc, xr, A, K, r0, k, lanes32(K - k));
  float sums[kRows][RB];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < RB; ++j) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
#pragma GCC unroll 16
  for (int i = 0; i < nrows; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < RB; ++j) u[i * R + r0 + j] = bf16_from_float(sums[i][j]).bits;
}

// The rows m and m + 1 (m + 1 only if kTwo) of one strip of adjoint_bf16: acc[j] += (xd[m], xd[m + 1])
// . (gBs[m, j], gBs[m + 1, j]) and, with dx, dx's LoRA term. Straight-line code: acc stays in
// registers across the caller's loop (GCC keeps arrays in memory across branchy loop bodies).
template <int P, bool kDrop, bool kDx, bool kTwo>
PEFTX_AVX512BF16 inline __attribute__((always_inline)) void adjoint_rows(
    __m512 (&acc)[2 * P], const __m512bh (&ap)[kDx ? P : 1], const uint16_t* x, int64_t m, int64_t K, int64_t k,
    __mmask16 in, const uint64_t* bits, int64_t words, int64_t bit0, __m512 scale, const uint16_t* gBs,
    const uint32_t* gBsT, uint16_t* dx) {
  constexpr int64_t R2 = 2 * P;
  // The rows are K apart (a new page each, beyond the hardware prefetchers): fetch the strip's
  // line of x and dx kPrefetchRows rows ahead (the next strip, 16 columns on, reads it again).
  // A prefetch past the end of the tensor is harmless (it never faults).
#pragma GCC unroll 16
  for (int r = 0; r < 2; ++r) {
    __builtin_prefetch(x + (m + kPrefetchRows + r) * K + k);
    if (kDx) __builtin_prefetch(dx + (m + kPrefetchRows + r) * K + k, 1);
  }
  __mmask16 keep[2] = {in, kTwo ? in : __mmask16{0}};
  if constexpr (kDrop) {
#pragma GCC unroll 16
    for (int r = 0; r < (kTwo ? 2 : 1); ++r)
      keep[r] &= static_cast<__mmask16>(bits[(m + r) * words + (bit0 >> 6)] >> (bit0 & 63));
  }
  // xd of the two rows (bf16, 0 where dropped) interleaved into dword pairs.
  __m512i xd[2];
#pragma GCC unroll 16
  for (int r = 0; r < 2; ++r) {
    if constexpr (kDrop) {
      xd[r] = bf16_low(_mm512_maskz_mul_ps(keep[r], load_bf16(x + (m + r) * K + k, keep[r]), scale));
    } else {
      xd[r] = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep[r], x + (m + r) * K + k));
    }
  }
  const __m512bh xp = (__m512bh)_mm512_or_si512(xd[0], _mm512_slli_epi32(xd[1], 16));
  const uint32_t* gT = gBsT + (m / 2) * R2;
#pragma GCC unroll 16
  for (int j = 0; j < 2 * P; ++j)
    acc[j] = _mm512_dpbf16_ps(acc[j], xp, (__m512bh)_mm512_set1_epi32(static_cast<int>(gT[j])));
  if constexpr (kDx) {
#pragma GCC unroll 16
    for (int r = 0; r < (kTwo ? 2 : 1); ++r) {
      const uint32_t* g = reinterpret_cast<const uint32_t*>(gBs + (m + r) * R2);
      __m512 t = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int i = 0; i < P; ++i) t = _mm512_dpbf16_ps(t, ap[i], (__m512bh)_mm512_set1_epi32(static_cast<int>(g[i])));
      uint16_t* dxr = dx + (m + r) * K + k;
      const __m512 sum = _mm512_fmadd_ps(t, scale, load_bf16(dxr, keep[r]));
      _mm256_mask_storeu_epi16(dxr, keep[r], (__m256i)_mm512_cvtneps_pbh(sum));
    }
  }
}

// One strip of 16 columns at k (lanes `in`) of adjoint_bf16, for R2 / 2 = P rank pairs.
template <int P, bool kDrop, bool kDx>
PEFTX_AVX512BF16 void adjoint_strip(const Dropout* d, const uint16_t* x, int64_t M, int64_t K, int64_t k,
                                    __mmask16 in, const uint64_t* bits, int64_t words, int64_t bit0,
                                    const uint16_t* gBs, const uint32_t* gBsT, const uint16_t* A, int64_t R,
                                    float* dA, bool dA_t, uint16_t* dx) {
  const __m512 scale = _mm512_set1_ps(kDrop ? d->scale : 1.0f);
  // A's strip as rank pairs: dword lane l of ap[i] = (A[2 i, k + l], A[2 i + 1, k + l]).
  __m512bh ap[kDx ? P : 1];
  ap[0] = (__m512bh)_mm512_setzero_si512();
#pragma GCC unroll 16
  for (int i = 0; i < (kDx ? P : 0); ++i) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, A + (2 * i) * K + k));
    const __m512i hi = 2 * i + 1 < R ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, A + (2 * i + 1) * K + k))
                                     : _mm512_setzero_si512();
    ap[i] = (__m512bh)_mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
  }
  __m512 acc[2 * P];
#pragma GCC unroll 16
  for (int j = 0; j < 2 * P; ++j) acc[j] = _mm512_setzero_ps();
  int64_t m = 0;
  for (; m + 1 < M; m += 2)
    adjoint_rows<P, kDrop, kDx, true>(acc, ap, x, m, K, k, in, bits, words, bit0, scale, gBs, gBsT, dx);
  if (m < M) adjoint_rows<P, kDrop, kDx, false>(acc, ap, x, m, K, k, in, bits, words, bit0, scale, gBs, gBsT, dx);
  // Compile-time indices only (a runtime bound on j would put acc in memory for the whole loop).
  if (dA_t) {  // dA^T [K, R]: lane l of acc[j] to dA[(k + l) R + j]
    const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(R)));
#pragma GCC unroll 16
    for (int j = 0; j < 2 * P; ++j)
      if (j < R) _mm512_mask_i32scatter_ps(dA + k * R + j, in, at, acc[j], 4);
    return;
  }
#pragma GCC unroll 16
  for (int j = 0; j < 2 * P; ++j)
    if (j < R) _mm512_mask_storeu_ps(dA + j * K + k, in, acc[j]);
}

// y[m, n .. n + 16 NV) for the rows m .. m + nrows (nrows <= 4) of expand_bf16; the last vector
// takes the lanes `tail`.
template <int NV>
PEFTX_AVX512BF16 void expand_tile(const uint32_t (*up)[8], int nrows, int64_t P, const uint32_t* BTp, int64_t N,
                                  int64_t n, __mmask16 tail, __m512 sv, uint16_t* y) {
  __m512 acc[kRows][NV];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < P; ++j) {
    __m512bh b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      b[v] = (__m512bh)_mm512_maskz_loadu_epi32(v == NV - 1 ? tail : __mmask16{0xFFFF}, BTp + j * N + n + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const __m512bh uv = (__m512bh)_mm512_set1_epi32(static_cast<int>(up[i][j]));
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], b[v], uv);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {  // compile-time i (see adjoint_strip's store)
    if (i >= nrows) break;
    uint16_t* yr = y + i * N + n;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? tail : __mmask16{0xFFFF};
      const __m512 sum = _mm512_fmadd_ps(sv, acc[i][v], load_bf16(yr + 16 * v, m));
      _mm256_mask_storeu_epi16(yr + 16 * v, m, (__m256i)_mm512_cvtneps_pbh(sum));
    }
  }
}

template <int P>
PEFTX_AVX512BF16 void adjoint_cols(const Dropout* d, const uint16_t* x, int64_t M, int64_t K, int64_t k0, int64_t k1,
                                   const uint64_t* bits, int64_t words, const uint16_t* gBs, const uint32_t* gBsT,
                                   const uint16_t* A, int64_t R, float* dA, bool dA_t, uint16_t* dx) {
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 in = lanes16(k1 - k);
    if (d != nullptr && dx != nullptr) {
      adjoint_strip<P, true, true>(d, x, M, K, k, in, bits, words, k - k0, gBs, gBsT, A, R, dA, dA_t, dx);
    } else if (d != nullptr) {
      adjoint_strip<P, true, false>(d, x, M, K, k, in, bits, words, k - k0, gBs, gBsT, A, R, dA, dA_t, dx);
    } else if (dx != nullptr) {
      adjoint_strip<P, false, true>(d, x, M, K, k, in, bits, words, k - k0, gBs, gBsT, A, R, dA, dA_t, dx);
    } else {
      adjoint_strip<P, false, false>(d, x, M, K, k, in, bits, words, k - k0, gBs, gBsT, A, R, dA, dA_t, dx);
    }
  }
}

}  // namespace

bool rank_bf16_supported() { return cpu_isa() == CpuIsa::avx512 && cpu_has_avx512bf16(); }

PEFTX_AVX512BF16 void shrink_bf16(const Dropout* d, const uint16_t* x, int64_t m0, int64_t m1, int64_t K,
                                  const uint16_t* A, int64_t R, uint16_t* buf, uint16_t* u) {
  for (int64_t m = m0; m < m1; m += kRows) {
    const int nrows = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
    const uint16_t* rows = x + m * K;
    if (d != nullptr) {
      dropout_rows(*d, static_cast<uint64_t>(m * K), nrows * K, DropDt::kBF16, rows, buf, nullptr, nullptr);
      rows = buf;
    }
    const uint16_t* xr[kRows];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) xr[i] = rows + (i < nrows ? i : 0) * K;  // missing rows repeat row 0
    uint16_t* ur = u + m * R;
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

PEFTX_AVX512BF16 void pack_row_pairs_bf16(const uint16_t* B, int64_t N, int64_t R, uint32_t* Bp) {
  const __mmask16 lanes = lanes16(R);
  for (int64_t q = 0; 2 * q < N; ++q) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, B + 2 * q * R));
    const __m512i hi = 2 * q + 1 < N ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, B + (2 * q + 1) * R))
                                     : _mm512_setzero_si512();
    _mm512_storeu_si512(Bp + 16 * q, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

PEFTX_AVX512BF16 void pack_rank_pairs_t_bf16(const uint16_t* B, int64_t N, int64_t R, uint32_t* BTp) {
  const int64_t P = (R + 1) / 2;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int* base = reinterpret_cast<const int*>(B);  // B's row n starts at dword n R / 2 (R even)
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 in = lanes16(N - n);
    for (int64_t i = 0; i < P; ++i) {
      __m512i v;
      if (R % 2 == 0) {
        // dword (n + l) R / 2 + i of B: the pair (B[n + l, 2 i], B[n + l, 2 i + 1]).
        const __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(n))),
                                                                _mm512_set1_epi32(static_cast<int>(R / 2))),
                                             _mm512_set1_epi32(static_cast<int>(i)));
        v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in, idx, base, 4);
      } else {
        // Odd R: rows are not dword aligned; gather the two words (the last rank's partner is 0).
        const uint16_t* w = B;
        alignas(64) uint32_t tmp[16];
        for (int l = 0; l < 16; ++l) {
          const int64_t r = n + l;
          tmp[l] = r < N ? static_cast<uint32_t>(w[r * R + 2 * i]) |
                               (2 * i + 1 < R ? static_cast<uint32_t>(w[r * R + 2 * i + 1]) << 16 : 0u)
                         : 0u;
        }
        v = _mm512_load_si512(tmp);
      }
      _mm512_mask_storeu_epi32(BTp + i * N + n, in, v);
    }
  }
}

PEFTX_AVX512BF16 void gbs_bf16(const uint16_t* g, int64_t m0, int64_t m1, int64_t N, const uint32_t* Bp, int64_t R,
                               float s, uint16_t* gBs) {
  const int64_t full = N / 2;
  const __mmask16 lanes = lanes16(R);
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t m = m0; m < m1; m += kRows) {
    const int nrows = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
    const uint16_t* gr[kRows];
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) gr[i] = g + (m + (i < nrows ? i : 0)) * N;  // missing rows repeat row m
    __m512 acc[kRows];
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t q = 0; q < full; ++q) {
      const __m512bh b = (__m512bh)_mm512_loadu_si512(Bp + 16 * q);
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i) {
        uint32_t pair;
        __builtin_memcpy(&pair, gr[i] + 2 * q, sizeof(pair));
        acc[i] = _mm512_dpbf16_ps(acc[i], b, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)));
      }
    }
    if (N % 2 != 0) {  // the last column, paired with a zero
      const __m512bh b = (__m512bh)_mm512_loadu_si512(Bp + 16 * full);
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], b, (__m512bh)_mm512_set1_epi32(static_cast<int>(gr[i][N - 1])));
    }
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) {
      if (i >= nrows) break;
      // bf16(g B), then bf16(that * s): the two roundings of the BLAS path (mm, then mul_).
      const __m512 gb = _mm512_castsi512_ps(_mm512_slli_epi32(bf16_low(acc[i]), 16));
      _mm256_mask_storeu_epi16(gBs + (m + i) * R, lanes, _mm512_cvtepi32_epi16(bf16_low(_mm512_mul_ps(gb, sv))));
    }
  }
}

PEFTX_AVX512BF16 void expand_bf16(const uint16_t* u, int64_t m0, int64_t m1, int64_t R, const uint32_t* BTp,
                                  int64_t N, float s, uint16_t* y) {
  const int64_t P = (R + 1) / 2;
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t m = m0; m < m1; m += kRows) {
    const int nrows = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
    // (u[m + i, 2 j], u[m + i, 2 j + 1]) as dwords (0 past R; missing rows repeat row 0).
    uint32_t up[kRows][8];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const uint16_t* ur = u + (m + (i < nrows ? i : 0)) * R;
      for (int64_t j = 0; j < P; ++j)
        up[i][j] = ur[2 * j] | (2 * j + 1 < R ? static_cast<uint32_t>(ur[2 * j + 1]) << 16 : 0u);
    }
    uint16_t* yr = y + m * N;
    int64_t n = 0;
    for (; n + 64 <= N; n += 64) expand_tile<4>(up, nrows, P, BTp, N, n, 0xFFFF, sv, yr);
    for (; n < N; n += 16) expand_tile<1>(up, nrows, P, BTp, N, n, lanes16(N - n), sv, yr);
  }
}

void adjoint_bf16(const Dropout* d, const uint16_t* x, int64_t M, int64_t K, int64_t k0, int64_t k1,
                  const uint16_t* gBs, const uint32_t* gBsT, const uint16_t* A, int64_t R, float* dA, bool dA_t,
                  uint16_t* dx, uint64_t* bits) {
  const int64_t words = (k1 - k0 + 63) / 64;
  if (d != nullptr) dropout_keep_bits(*d, static_cast<uint64_t>(k0), K, M, k1 - k0, bits);
  switch ((R + 1) / 2) {
    case 1: return adjoint_cols<1>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx);
    case 2: return adjoint_cols<2>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx);
    case 3: return adjoint_cols<3>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx);
    case 4: return adjoint_cols<4>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx);
    case 5: return adjoint_cols<5>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx);
    case 6: return adjoint_cols<6>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx);
    case 7: return adjoint_cols<7>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx);
    default: return adjoint_cols<8>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx);
  }
}

}  // namespace cpu
}  // namespace lora
}  // namespace peftx
