// AVX-512 BF16 kernels of rank_bf16.h.
//
// shrink: lanes over k; 4 rows x up to 4 ranks of accumulators (each loaded vector feeds 4 dot
// products), reduced across lanes at the end. Under dropout the 4 rows are first dropped out into
// an L1 buffer from their packed keep bits, rounded as the op's other paths round them.
//
// adjoint: per column chunk, first a pass along the rows (x and dx read front to back, each row's
// segment once): the dropped-out rows are stored in pairs, (xd[m, k], xd[m + 1, k]) per dword, and
// dx's LoRA term, a sum over the ranks, is added with A's chunk held as rank pairs (A[2 i, k],
// A[2 i + 1, k]) against (gBs[m, 2 i], gBs[m, 2 i + 1]) broadcast. Then each 16-column strip of the
// packed pairs gives dA, a sum over the rows: vdpbf16ps of a packed vector against (gBs[m, j],
// gBs[m + 1, j]) broadcast, one accumulator per rank (R <= 16 registers for the whole strip). The mask
// of each row pair is drawn into packed bits as the pass reaches it.
//
// g B (for gBs = s g B) rides on dB's packing pass over g: lanes over the ranks, so B is read as pairs
// of rows (B[2 q, j], B[2 q + 1, j]) against (g[m, 2 q], g[m, 2 q + 1]) broadcast from the row segment
// just loaded: no transpose of B and no lane reductions (4 partial sums per row, so the row's
// vdpbf16ps do not chain on one accumulator's latency). expand (y += s u B^T): lanes over the outputs, rank pairs of B^T against (u[m, 2 i], u[m, 2 i + 1]) broadcast.
//
// Every loop over accumulators has a compile-time trip count and is unrolled (#pragma GCC unroll):
// GCC otherwise keeps such arrays in memory, a store per vdpbf16ps.
// The outputs y and dx are updated with one FMA and vcvtneps2bf16 (round to nearest even, NaN kept;
// it flushes fp32 subnormal results, below 1.2e-38, to zero).
#include "lora/cpu/rank_bf16.h"

#include <algorithm>
#include <cstring>

#include "common/cpu_isa.h"
#include "lora/cpu/adjoint_stores_avx512.h"
#include "lora/dropout_cpu.h"
#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace lora {
namespace cpu {
namespace {

using nf4::cpu::avx512::bf16_high;

constexpr int kRows = 4;
constexpr int64_t kPrefetchPairs = 2;

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

// The row-wise pass of adjoint_bf16 over its column chunk [k0, k1): for each row pair (m, m + 1),
// xd of the two rows (bf16, 0 where dropped) interleaved into dword pairs, 16 columns per vector, to
// pk[m / 2][g] (g = the 16-column group; a row pair's vectors are contiguous, so the pass stores
// sequentially: the [g][m / 2] order put its consecutive stores Mh lines apart, all in one L1 set),
// and, with dx, dx's LoRA term added into both rows. Each row's
// segment of x and dx is read once, front to back: walking a 16-column strip down the rows instead
// (rows K elements apart, a power-of-two stride for the usual K) maps all of a strip's lines to one
// L1 set and a few L2 sets, so they were evicted before the next strip read the rest of the line.
// ap: A's chunk as rank pairs, ap[g * P + i] lane l = (A[2 i, k0 + 16 g + l], A[2 i + 1, ...]).
// With kGb (no dropout, no dx: the dB pass over g, x = g), each row's segment also adds its share of
// g B into gpart->acc (see GbsPartial), read from L1 right after the packing loaded it.
template <int P, bool kDrop, bool kDx, bool kGb = false>
PEFTX_AVX512BF16 void adjoint_pack(const Dropout* d, const uint16_t* x, int64_t M, int64_t K, int64_t k0, int64_t k1,
                                   uint64_t* bits, int64_t words, const uint16_t* gBs, const __m512bh* ap,
                                   uint16_t* dx, uint32_t* pk, [[maybe_unused]] const GbsPartial* gpart = nullptr) {
  static_assert(!kGb || (!kDrop && !kDx), "the g B partials ride on the plain packing pass");
  constexpr int64_t R2 = 2 * P;
  const int64_t groups = (k1 - k0 + 15) / 16, Mh = (M + 1) / 2;
  const __m512 scale = _mm512_set1_ps(kDrop ? d->scale : 1.0f);
  for (int64_t h = 0; h < Mh; ++h) {
    const int64_t m = 2 * h;
    const int rows = m + 1 < M ? 2 : 1;
    // The row pair's keep bits, drawn here rather than for the whole chunk up front (a scratch of two
    // rows, and the Philox work overlaps the loads in flight).
    if constexpr (kDrop) dropout_keep_bits(CpuIsa::avx512, *d, static_cast<uint64_t>(m * K + k0), K, rows, k1 - k0, bits);
    // (gBs[m + r, 2 i], gBs[m + r, 2 i + 1]) broadcast, for dx's term (the second row repeats the first
    // when M is odd; its stores are masked off).
    __m512bh gb[2][kDx ? P : 1];
    if constexpr (kDx) {
#pragma GCC unroll 2
      for (int r = 0; r < 2; ++r) {
        const uint32_t* g = reinterpret_cast<const uint32_t*>(gBs + (m + (r < rows ? r : 0)) * R2);
#pragma GCC unroll 16
        for (int i = 0; i < P; ++i) gb[r][i] = (__m512bh)_mm512_set1_epi32(static_cast<int>(g[i]));
      }
    }
    // g B partial sums of the row pair (second row repeating the first when M is odd), kGbsSplit
    // per row over interleaved column pairs.
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
      __mmask16 keep[2] = {in, rows == 2 ? in : __mmask16{0}};
      {
        // The rows' segments are short runs K apart, which the hardware prefetchers do not run ahead
        // of: fetch those of the row pair kPrefetchPairs ahead, one 64-byte line (two groups' columns)
        // per group, alternating between its two rows, so the pair's lines arrive over this pair's
        // pass (a burst of all of them up front left this pair's loads queued behind it).
        const int64_t at = std::min(M - 1, m + 2 * kPrefetchPairs + (gi & 1)) * K + k0 + 32 * (gi >> 1);
        __builtin_prefetch(x + at);
        if constexpr (kDx) __builtin_prefetch(dx + at, 1);
      }
      if constexpr (kGb) {
        // The group's column pairs (k + 2 c, k + 2 c + 1) against B's row pairs Bp[k / 2 + c]; a last odd
        // column (the matrix's end) pairs with 0, as Bp pairs B's last row with a zero row.
        const int64_t kc = std::min<int64_t>(16, k1 - k);
        const uint32_t* bq = gpart->Bp + 16 * (k / 2);
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {
          if (2 * c >= kc) break;
          const __m512bh b = (__m512bh)_mm512_loadu_si512(bq + 16 * c);
#pragma GCC unroll 2
          for (int r = 0; r < 2; ++r) {
            const uint16_t* gp = x + (m + (r < rows ? r : 0)) * K + k + 2 * c;
            uint32_t pair = gp[0];
            if (2 * c + 1 < kc) __builtin_memcpy(&pair, gp, sizeof(pair));
            gacc[r][c % kGbsSplit] =
                _mm512_dpbf16_ps(gacc[r][c % kGbsSplit], b, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)));
          }
        }
      }
      if constexpr (kDrop) {
#pragma GCC unroll 2
        for (int r = 0; r < 2; ++r)
          if (r < rows) keep[r] &= static_cast<__mmask16>(bits[r * words + (gi >> 2)] >> (16 * (gi & 3)));
      }
      __m512i xd[2];
#pragma GCC unroll 2
      for (int r = 0; r < 2; ++r) {
        const uint16_t* xr = x + (m + r) * K + k;
        if constexpr (kDrop) {
          xd[r] = bf16_low(_mm512_maskz_mul_ps(keep[r], load_bf16(xr, keep[r]), scale));
        } else {
          xd[r] = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep[r], xr));
        }
      }
      _mm512_storeu_si512(pk + (h * groups + gi) * 16, _mm512_or_si512(xd[0], _mm512_slli_epi32(xd[1], 16)));
      if constexpr (kDx) {
#pragma GCC unroll 2
        for (int r = 0; r < 2; ++r) {
          // Two partial sums (even and odd rank pairs): a chain of P dependent vdpbf16ps per group
          // would leave the FMA pipes waiting on its latency.
          __m512 t2[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
#pragma GCC unroll 16
          for (int i = 0; i < P; ++i) t2[i & 1] = _mm512_dpbf16_ps(t2[i & 1], ap[gi * P + i], gb[r][i]);
          const __m512 t = _mm512_add_ps(t2[0], t2[1]);
          uint16_t* dxr = dx + (m + r) * K + k;
          const __m512 sum = _mm512_fmadd_ps(t, scale, load_bf16(dxr, keep[r]));
          _mm256_mask_storeu_epi16(dxr, keep[r], (__m256i)_mm512_cvtneps_pbh(sum));
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

// dA of the 16 columns at k (lanes `in`) from their packed row pairs, pk[h * stride] for h < Mh:
// acc[j] = sum over row pairs of (xd[m, k + l], xd[m + 1, k + l]) . (gBs[m, j], gBs[m + 1, j]).
template <int P>
PEFTX_AVX512BF16 void adjoint_strip(const uint32_t* pk, int64_t stride, int64_t Mh, const uint32_t* gBsT, int64_t R,
                                    int64_t K, int64_t k, __mmask16 in, float* dA, bool dA_t) {
  constexpr int64_t R2 = 2 * P;
  __m512 acc[2 * P];
#pragma GCC unroll 16
  for (int j = 0; j < 2 * P; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t h = 0; h < Mh; ++h) {
    const __m512bh xp = (__m512bh)_mm512_loadu_si512(pk + h * stride);
    const uint32_t* gT = gBsT + h * R2;
#pragma GCC unroll 16
    for (int j = 0; j < 2 * P; ++j)
      acc[j] = _mm512_dpbf16_ps(acc[j], xp, (__m512bh)_mm512_set1_epi32(static_cast<int>(gT[j])));
  }
  store_dA(acc, 0, R, K, k, in, dA, dA_t);
}

// dA of two adjacent strips (columns k .. k + 32, lanes in0 / in1), as adjoint_strip: each (gBs[m, j],
// gBs[m + 1, j]) broadcast feeds both strips' dot products, against one per dot product there. The
// ranks run in passes of up to 8 (2 strips x 8 accumulators); the second pass finds the two strips'
// packed pairs (2 x Mh x 64 bytes, 32 KiB at 512 tokens) in L1.
template <int P>
PEFTX_AVX512BF16 void adjoint_strip2(const uint32_t* pk, int64_t stride, int64_t Mh, const uint32_t* gBsT, int64_t R,
                                     int64_t K, int64_t k, __mmask16 in0, __mmask16 in1, float* dA, bool dA_t) {
  constexpr int64_t R2 = 2 * P;
  constexpr int kJ = 2 * P < 8 ? 2 * P : 8;  // ranks per pass
  for (int j0 = 0; j0 < 2 * P; j0 += kJ) {
    __m512 acc[2][kJ];
#pragma GCC unroll 8
    for (int j = 0; j < kJ; ++j) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
    for (int64_t h = 0; h < Mh; ++h) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(pk + h * stride);
      const __m512bh x1 = (__m512bh)_mm512_loadu_si512(pk + h * stride + 16);
      const uint32_t* gT = gBsT + h * R2 + j0;
#pragma GCC unroll 8
      for (int j = 0; j < kJ; ++j) {
        const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(gT[j]));
        acc[0][j] = _mm512_dpbf16_ps(acc[0][j], x0, b);
        acc[1][j] = _mm512_dpbf16_ps(acc[1][j], x1, b);
      }
    }
    store_dA(acc[0], j0, R, K, k, in0, dA, dA_t);
    store_dA(acc[1], j0, R, K, k + 16, in1, dA, dA_t);
  }
}

// y[m, n .. n + 16 NV) for the rows m .. m + nrows (nrows <= 4) of expand_bf16; the last vector
// takes the lanes `tail`.
template <int NV>
PEFTX_AVX512BF16 void expand_tile(const uint32_t (*up)[8], int nrows, int64_t P, const uint32_t* BTp, int64_t N,
                                  int64_t n, __mmask16 tail, __m512 sv, uint16_t* y, uint16_t* pf = nullptr) {
  if (pf != nullptr) {
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) {
      __builtin_prefetch(pf + i * N + n, 1);
      __builtin_prefetch(pf + i * N + n + 32, 1);
    }
  }
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
                                   uint64_t* bits, int64_t words, const uint16_t* gBs, const uint32_t* gBsT,
                                   const uint16_t* A, int64_t R, float* dA, bool dA_t, uint16_t* dx, uint32_t* pk,
                                   const GbsPartial* gb) {
  const int64_t groups = (k1 - k0 + 15) / 16, Mh = (M + 1) / 2;
  // A's chunk as rank pairs (only with dx): at most kMaxAdjointCols / 16 groups of P vectors.
  __m512bh ap[kMaxAdjointCols / 16 * P];
  for (int64_t gi = 0; dx != nullptr && gi < groups; ++gi) {
    const int64_t k = k0 + 16 * gi;
    const __mmask16 in = lanes16(k1 - k);
    for (int i = 0; i < P; ++i) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, A + (2 * i) * K + k));
      const __m512i hi = 2 * i + 1 < R
                             ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, A + (2 * i + 1) * K + k))
                             : _mm512_setzero_si512();
      ap[gi * P + i] = (__m512bh)_mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
    }
  }
  if (d != nullptr && dx != nullptr) {
    adjoint_pack<P, true, true>(d, x, M, K, k0, k1, bits, words, gBs, ap, dx, pk);
  } else if (d != nullptr) {
    adjoint_pack<P, true, false>(d, x, M, K, k0, k1, bits, words, gBs, ap, dx, pk);
  } else if (dx != nullptr) {
    adjoint_pack<P, false, true>(d, x, M, K, k0, k1, bits, words, gBs, ap, dx, pk);
  } else if (gb != nullptr) {
    adjoint_pack<P, false, false, true>(d, x, M, K, k0, k1, bits, words, gBs, ap, dx, pk, gb);
  } else {
    adjoint_pack<P, false, false>(d, x, M, K, k0, k1, bits, words, gBs, ap, dx, pk);
  }
  int64_t gi = 0;
  for (; gi + 2 <= groups; gi += 2) {
    const int64_t k = k0 + 16 * gi;
    adjoint_strip2<P>(pk + gi * 16, groups * 16, Mh, gBsT, R, K, k, lanes16(k1 - k), lanes16(k1 - k - 16), dA, dA_t);
  }
  for (; gi < groups; ++gi) {
    const int64_t k = k0 + 16 * gi;
    adjoint_strip<P>(pk + gi * 16, groups * 16, Mh, gBsT, R, K, k, lanes16(k1 - k), dA, dA_t);
  }
}

// xd of `nrows` rows of x [., K] into buf [nrows, K] bf16, from their keep bits (bits[r * words + i / 64]
// bit i % 64): 32 elements per step, the even and odd elements of each dword as two fp32 vectors, so no
// lanes cross. Rounds exactly as dropout_rows (fp32 multiply, one round to bf16, NaN kept).
PEFTX_AVX512BF16 void drop_rows_bf16(const uint16_t* x, int nrows, int64_t K, const uint64_t* bits, int64_t words,
                                     float scale, uint16_t* buf) {
  const __m512 sv = _mm512_set1_ps(scale);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int r = 0; r < nrows; ++r) {
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 in = lanes32(K - k);
      const __mmask32 keep = in & static_cast<__mmask32>(bits[r * words + (k >> 6)] >> (k & 63));
      const __m512i v = _mm512_maskz_loadu_epi16(keep, x + r * K + k);
      const __m512 ev = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), sv);
      const __m512 od = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high)), sv);
      const __m512i w = _mm512_or_si512(_mm512_srli_epi32(bf16_high(ev), 16), _mm512_and_si512(bf16_high(od), high));
      _mm512_mask_storeu_epi16(buf + r * K + k, in, w);
    }
  }
}

}  // namespace

bool rank_bf16_supported() { return cpu_isa() == CpuIsa::avx512 && cpu_has_avx512bf16(); }

PEFTX_AVX512BF16 void shrink_bf16(const Dropout* d, const uint16_t* x, int64_t m0, int64_t m1, int64_t K,
                                  const uint16_t* A, int64_t R, uint16_t* buf, uint64_t* bits, uint16_t* u) {
  const int64_t words = (K + 63) / 64;
  for (int64_t m = m0; m < m1; m += kRows) {
    const int nrows = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
    const uint16_t* rows = x + m * K;
    if (d != nullptr) {
      dropout_keep_bits(CpuIsa::avx512, *d, static_cast<uint64_t>(m * K), K, nrows, K, bits);
      drop_rows_bf16(rows, nrows, K, bits, words, d->scale, buf);
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

void pack_rank_pairs_t_bf16(const uint16_t* B, int64_t N, int64_t R, uint32_t* BTp) {
  // A [N, P] -> [P, N] transpose of B's rank pairs, B read in order (16-lane gathers of rows 32 bytes
  // apart took 1.5x as long).
  const int64_t P = (R + 1) / 2;
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t* b = B + n * R;
    for (int64_t i = 0; i < P; ++i) {
      uint32_t pair = b[2 * i];  // odd R: the last rank pairs with 0
      if (2 * i + 1 < R) std::memcpy(&pair, b + 2 * i, sizeof(pair));
      BTp[i * N + n] = pair;
    }
  }
}

PEFTX_AVX512BF16 void pack_row_pairs_t_bf16(const uint16_t* g, int64_t M, int64_t R, const float* scale, int64_t R2,
                                            uint32_t* gT) {
  const __mmask16 in = lanes16(R), out = lanes16(R2);
  auto row = [&](int64_t m) PEFTX_AVX512BF16 {
    if (m >= M) return _mm512_setzero_si512();
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, g + m * R));
    if (scale == nullptr) return v;
    // bf16(float(g) * scale): at::mul's rounding of a bf16 tensor times a scalar.
    return bf16_low(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_set1_ps(*scale)));
  };
  for (int64_t h = 0; 2 * h < M; ++h)
    _mm512_mask_storeu_epi32(gT + h * R2, out, _mm512_or_si512(row(2 * h), _mm512_slli_epi32(row(2 * h + 1), 16)));
}

PEFTX_AVX512BF16 void gbs_from_partials(const float* acc, int64_t parts, int64_t M, int64_t R, float s,
                                        uint16_t* gBs) {
  const __mmask16 lanes = lanes16(R);
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t m = 0; m < M; ++m) {
    __m512 sum = _mm512_loadu_ps(acc + m * 16);
    for (int64_t t = 1; t < parts; ++t) sum = _mm512_add_ps(sum, _mm512_loadu_ps(acc + (t * M + m) * 16));
    // bf16(g B), then bf16(that * s): the two roundings of the BLAS path (mm, then mul_).
    const __m512 gb = _mm512_castsi512_ps(_mm512_slli_epi32(bf16_low(sum), 16));
    _mm256_mask_storeu_epi16(gBs + m * R, lanes, _mm512_cvtepi32_epi16(bf16_low(_mm512_mul_ps(gb, sv))));
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
    // The next row group's y, a tile's lines at a time (rows N apart: the hardware prefetchers
    // would start on each row only once its loads missed).
    uint16_t* pf = m + 2 * kRows <= m1 ? yr + kRows * N : nullptr;
    for (; n + 64 <= N; n += 64) expand_tile<4>(up, nrows, P, BTp, N, n, 0xFFFF, sv, yr, pf);
    for (; n < N; n += 16) expand_tile<1>(up, nrows, P, BTp, N, n, lanes16(N - n), sv, yr);
  }
}

void adjoint_bf16(const Dropout* d, const uint16_t* x, int64_t M, int64_t K, int64_t k0, int64_t k1,
                  const uint16_t* gBs, const uint32_t* gBsT, const uint16_t* A, int64_t R, float* dA, bool dA_t,
                  uint16_t* dx, uint64_t* bits, uint32_t* pk, const GbsPartial* gb) {
  const int64_t words = (k1 - k0 + 63) / 64;
  switch ((R + 1) / 2) {
    case 1: return adjoint_cols<1>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx, pk, gb);
    case 2: return adjoint_cols<2>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx, pk, gb);
    case 3: return adjoint_cols<3>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx, pk, gb);
    case 4: return adjoint_cols<4>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx, pk, gb);
    case 5: return adjoint_cols<5>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx, pk, gb);
    case 6: return adjoint_cols<6>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx, pk, gb);
    case 7: return adjoint_cols<7>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx, pk, gb);
    default: return adjoint_cols<8>(d, x, M, K, k0, k1, bits, words, gBs, gBsT, A, R, dA, dA_t, dx, pk, gb);
  }
}

}  // namespace cpu
}  // namespace lora
}  // namespace peftx
