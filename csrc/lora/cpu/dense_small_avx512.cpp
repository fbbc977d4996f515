// AVX-512 kernels of dense_small.h. Every loop is blocked so that each 512-bit load feeds several
// FMAs / dot products: on the 2-core Zen 5 machine we measure, loops that load one operand per
// instruction ran at 2-4 G FMA or vdpbf16ps per second per core, against about 7 G with register
// operands.
//   x W^T: lanes over k (the reduction), 4 rows x 4 tokens of accumulators, reduced across lanes at
//     the end; rows in groups of 8 and features in panels whose x (all tokens) stays in L1, so W
//     streams from memory once.
//   g W, fp32: lanes over k (the output), 6 tokens x 64 features of accumulators, the g value
//     broadcast; W in strips of 32 rows that stay in L1 across the token tiles.
//   g W, bf16: vdpbf16ps over pairs of rows (nf4/cpu/pair_dot_avx512.h), the pair vectors made by
//     vpunpck{l,h}wd of two rows.
#include "lora/cpu/dense_small.h"

#include <algorithm>
#include <vector>

#include "nf4/cpu/pair_dot_avx512.h"
#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace lora {
namespace cpu {
namespace {

using nf4::cpu::avx512::kPairChunk;
using nf4::cpu::avx512::pair_dot_chunk;

struct F32 {
  using T = float;
  using V = __m512;
  static constexpr int64_t kStep = 16;
  PEFTX_AVX512 static inline __attribute__((always_inline)) V load(const T* p) { return _mm512_loadu_ps(p); }
  PEFTX_AVX512 static inline __attribute__((always_inline)) __m512 dot(__m512 acc, V w, V x) {
    return _mm512_fmadd_ps(w, x, acc);
  }
};

struct BF16 {
  using T = uint16_t;
  using V = __m512bh;
  static constexpr int64_t kStep = 32;
  PEFTX_AVX512BF16 static inline __attribute__((always_inline)) V load(const T* p) {
    return (__m512bh)_mm512_loadu_si512(p);
  }
  PEFTX_AVX512BF16 static inline __attribute__((always_inline)) __m512 dot(__m512 acc, V w, V x) {
    return _mm512_dpbf16_ps(acc, w, x);
  }
};

constexpr int kRowTile = 4, kTokenTile = 4, kGroupRows = 8;
constexpr int64_t kMaxTokens = 32;
constexpr int64_t kPanelBytes = 24 << 10;

// Features [k0, k1) of rows w[0 .. RW) for tokens x[0 .. TM) (row stride K both), adding to
// part[r * ldp + m].
template <class E, int TM, int RW>
PEFTX_AVX512BF16 void rows_tile(const typename E::T* w, const typename E::T* x, int64_t K, int64_t k0, int64_t k1,
                                __m512* part, int64_t ldp) {
  __m512 acc[RW][TM];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < TM; ++m) acc[r][m] = part[r * ldp + m];
  for (int64_t k = k0; k < k1; k += E::kStep) {
    typename E::V wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = E::load(w + r * K + k);
    for (int m = 0; m < TM; ++m) {
      const typename E::V xv = E::load(x + m * K + k);
      for (int r = 0; r < RW; ++r) acc[r][m] = E::dot(acc[r][m], wv[r], xv);
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < TM; ++m) part[r * ldp + m] = acc[r][m];
}

// rows_tile<E, tm, rw> for run-time tm, rw in [1, 4].
template <class E, int TM = kTokenTile, int RW = kRowTile>
PEFTX_AVX512BF16 void rows_tile_n(int tm, int rw, const typename E::T* w, const typename E::T* x, int64_t K,
                                  int64_t k0, int64_t k1, __m512* part, int64_t ldp) {
  if (tm < TM) {
    if constexpr (TM > 1) return rows_tile_n<E, TM - 1, RW>(tm, rw, w, x, K, k0, k1, part, ldp);
  } else if (rw < RW) {
    if constexpr (RW > 1) return rows_tile_n<E, TM, RW - 1>(tm, rw, w, x, K, k0, k1, part, ldp);
  } else {
    rows_tile<E, TM, RW>(w, x, K, k0, k1, part, ldp);
  }
}

template <class E>
PEFTX_AVX512BF16 void dense_rows(const typename E::T* w, const typename E::T* x, int64_t M, int64_t K, int64_t n0,
                                 int64_t n1, float* y, int64_t ldy) {
  const int64_t elem = static_cast<int64_t>(sizeof(typename E::T));
  int64_t P = std::max<int64_t>(256, kPanelBytes / (M * elem) / 64 * 64);
  if (P >= K) P = K;
  alignas(64) __m512 part[kGroupRows * kMaxTokens];
  for (int64_t og = n0; og < n1; og += kGroupRows) {
    const int64_t nr = std::min<int64_t>(kGroupRows, n1 - og);
    for (int64_t i = 0; i < nr * M; ++i) part[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += P) {
      const int64_t k1 = std::min(K, k0 + P);
      for (int64_t r = 0; r < nr; r += kRowTile) {
        const int rw = static_cast<int>(std::min<int64_t>(kRowTile, nr - r));
        for (int64_t m0 = 0; m0 < M; m0 += kTokenTile) {
          const int tm = static_cast<int>(std::min<int64_t>(kTokenTile, M - m0));
          rows_tile_n<E>(tm, rw, w + (og + r) * K, x + m0 * K, K, k0, k1, part + r * M + m0, M);
        }
      }
    }
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t m = 0; m < M; ++m) y[m * ldy + og + r] = _mm512_reduce_add_ps(part[r * M + m]);
  }
}

constexpr int64_t kTCols = 64;       // fp32 g W: features per chunk (4 vectors)
constexpr int64_t kTStripRows = 32;  // rows per strip (32 x 256 bytes of W stay in L1)
constexpr int kTTokens = 6;          // tokens per pass: 6 x 4 accumulators

// The first tile of a strip (prefetch) also fetches the next strip's runs of W: 256-byte runs
// 4 * K bytes apart, which the hardware prefetcher does not follow.
template <int TT>
PEFTX_AVX512 void t_tile_f32(const float* w, int64_t K, const float* g, int64_t ldg, int64_t rows, float* acc_mem,
                             const float* prefetch) {
  __m512 acc[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_loadu_ps(acc_mem + t * kTCols + 16 * v);
  for (int64_t n = 0; n < rows; ++n) {
    if (prefetch != nullptr)
      for (int v = 0; v < 4; ++v) _mm_prefetch(reinterpret_cast<const char*>(prefetch + n * K + 16 * v), _MM_HINT_T0);
    __m512 wv[4];
    for (int v = 0; v < 4; ++v) wv[v] = _mm512_loadu_ps(w + n * K + 16 * v);
    for (int t = 0; t < TT; ++t) {
      const __m512 gs = _mm512_set1_ps(g[t * ldg + n]);
      for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_fmadd_ps(wv[v], gs, acc[t][v]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(acc_mem + t * kTCols + 16 * v, acc[t][v]);
}

// Feature (within a 128-feature chunk) of lane l of pair vector v = 2 i + u: vector i covers
// features 32 i .. 32 i + 31; u = 0 / 1 the low / high unpack (per 128-bit lane L: words
// 8 L .. 8 L + 3 / 8 L + 4 .. 8 L + 7).
constexpr int pair_feature(int v, int l) { return 32 * (v / 2) + 8 * (l / 4) + (v % 2) * 4 + l % 4; }

}  // namespace

PEFTX_AVX512 void dense_rows_f32(const float* w, const float* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                                 float* y, int64_t ldy) {
  dense_rows<F32>(w, x, M, K, n0, n1, y, ldy);
}

PEFTX_AVX512BF16 void dense_rows_bf16(const uint16_t* w, const uint16_t* x, int64_t M, int64_t K, int64_t n0,
                                      int64_t n1, float* y, int64_t ldy) {
  dense_rows<BF16>(w, x, M, K, n0, n1, y, ldy);
}

PEFTX_AVX512 void dense_t_f32(const float* w, const float* g, int64_t ldg, int64_t M, int64_t N, int64_t K, int64_t c0,
                              int64_t c1, float* out) {
  std::vector<float> acc(static_cast<size_t>(M * kTCols));
  for (int64_t k = c0; k < c1; k += kTCols) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t n0 = 0; n0 < N; n0 += kTStripRows) {
      const int64_t rows = std::min(kTStripRows, N - n0);
      const float* ws = w + n0 * K + k;
      // The next strip (or the next chunk's first), fetched while the first tile runs.
      const int64_t next = n0 + kTStripRows < N ? (n0 + kTStripRows) * K + k : (k + kTCols < c1 ? k + kTCols : -1);
      const int64_t next_rows = n0 + kTStripRows < N ? std::min(kTStripRows, N - n0 - kTStripRows) : kTStripRows;
      for (int64_t m0 = 0; m0 < M; m0 += kTTokens) {
        const float* gm = g + m0 * ldg + n0;
        float* am = acc.data() + m0 * kTCols;
        const float* pf = m0 == 0 && next >= 0 && rows == next_rows ? w + next : nullptr;
        switch (std::min<int64_t>(kTTokens, M - m0)) {
          case 1: t_tile_f32<1>(ws, K, gm, ldg, rows, am, pf); break;
          case 2: t_tile_f32<2>(ws, K, gm, ldg, rows, am, pf); break;
          case 3: t_tile_f32<3>(ws, K, gm, ldg, rows, am, pf); break;
          case 4: t_tile_f32<4>(ws, K, gm, ldg, rows, am, pf); break;
          case 5: t_tile_f32<5>(ws, K, gm, ldg, rows, am, pf); break;
          default: t_tile_f32<6>(ws, K, gm, ldg, rows, am, pf); break;
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) std::copy_n(acc.data() + m * kTCols, kTCols, out + m * K + k);
  }
}

PEFTX_AVX512BF16 void dense_t_bf16(const uint16_t* w, const uint16_t* g, int64_t ldg, int64_t M, int64_t N, int64_t K,
                                   int64_t c0, int64_t c1, float* out) {
  std::vector<float> acc(static_cast<size_t>(M * kPairChunk));
  int feature[kPairChunk];
  for (int v = 0; v < 8; ++v)
    for (int l = 0; l < 16; ++l) feature[16 * v + l] = pair_feature(v, l);
  for (int64_t k = c0; k < c1; k += kPairChunk) {
    pair_dot_chunk(N, K, g, ldg, M, k, feature, acc.data(), out,
                   [&](int64_t n0, int64_t npairs, __m512i* pairs) PEFTX_AVX512BF16 {
      for (int64_t q = 0; q < npairs; ++q) {
        const int64_t n = n0 + 2 * q;
        const uint16_t* a = w + n * K + k;
        const uint16_t* b = n + 1 < N ? a + K : nullptr;
        for (int i = 0; i < 4; ++i) {
          const __m512i av = _mm512_loadu_si512(a + 32 * i);
          const __m512i bv = b != nullptr ? _mm512_loadu_si512(b + 32 * i) : _mm512_setzero_si512();
          pairs[q * 8 + 2 * i] = _mm512_unpacklo_epi16(av, bv);
          pairs[q * 8 + 2 * i + 1] = _mm512_unpackhi_epi16(av, bv);
        }
      }
    });
  }
}

}  // namespace cpu
}  // namespace lora
}  // namespace peftx
