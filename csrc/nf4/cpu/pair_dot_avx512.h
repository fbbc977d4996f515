// The row-pair vdpbf16ps loop of the bf16 transposed products for few tokens (out = g W, g bf16
// [tokens, ldg], W [rows, cols] bf16 or NF4), shared by the NF4 kernel (gemv_t_bf16_avx512.cpp) and
// the dense LoRA base kernel (lora/cpu/dense_small_avx512.cpp). For one chunk of 128 features, the
// caller's fill() writes strips of up to kPairStripRows rows into an L1 buffer as, per pair of rows
// (n, n + 1), eight vectors of (W[n, f], W[n + 1, f]) bf16 pairs (a missing row n + 1 as zeros; g's
// pad column is zero too); each tile of up to 3 tokens then runs through the strip with 24 fp32
// accumulators, the pair (g[m, n], g[m, n + 1]) broadcast as one dword, so each buffer load feeds 3
// dot products. The accumulators' lanes are the fill's permutation of the chunk's features; the
// caller maps them back (feature[v * 16 + l]).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {

constexpr int64_t kPairChunk = 128;     // features per chunk
constexpr int64_t kPairStripRows = 32;  // rows per strip: 16 pairs x 8 vectors x 64 bytes = 16 KiB
constexpr int kPairTileTokens = 3;      // tokens per pass over a strip: 3 x 8 accumulators

template <int TT>
PEFTX_AVX512BF16 inline void pair_dot_tile(const __m512i* pairs, int64_t npairs, const uint16_t* g, int64_t ldg,
                                           int64_t n0, float* acc_mem) {
  __m512 acc[TT][8];
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < 8; ++v) acc[t][v] = _mm512_loadu_ps(acc_mem + t * kPairChunk + 16 * v);
  for (int64_t q = 0; q < npairs; ++q) {
    __m512bh gp[TT];
    for (int t = 0; t < TT; ++t) {
      uint32_t pair;
      __builtin_memcpy(&pair, g + t * ldg + n0 + 2 * q, sizeof(pair));
      gp[t] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
    }
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {
      const __m512bh wv = (__m512bh)_mm512_load_si512(pairs + q * 8 + v);
      for (int t = 0; t < TT; ++t) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], wv, gp[t]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < 8; ++v) _mm512_storeu_ps(acc_mem + t * kPairChunk + 16 * v, acc[t][v]);
}

// out[m * cols + k0 + feature[i]] = sum_n g[m, n] W[n, k0 + feature[i]] for the chunk at k0, with
// fill(n0, npairs, pairs) writing the strip of rows [n0, n0 + 2 npairs) (rows past `rows` zero).
// acc: tokens * kPairChunk floats of scratch.
template <typename Fill>
PEFTX_AVX512BF16 inline void pair_dot_chunk(int64_t rows, int64_t cols, const uint16_t* g, int64_t ldg, int64_t tokens,
                                            int64_t k0, const int* feature, float* acc, float* out, Fill&& fill) {
  alignas(64) __m512i pairs[kPairStripRows / 2 * 8];
  std::fill(acc, acc + tokens * kPairChunk, 0.0f);
  for (int64_t n0 = 0; n0 < rows; n0 += kPairStripRows) {
    const int64_t npairs = (std::min(kPairStripRows, rows - n0) + 1) / 2;
    fill(n0, npairs, pairs);
    for (int64_t m0 = 0; m0 < tokens;) {
      const uint16_t* gm = g + m0 * ldg;
      float* am = acc + m0 * kPairChunk;
      // Tiles of 3, ending 2 + 2 rather than 3 + 1: a 1-token tile has 8 accumulator chains, too
      // few to cover vdpbf16ps' latency (6 cycles) at two per cycle.
      const int64_t left = tokens - m0;
      const int64_t tt = left == 4 ? 2 : std::min<int64_t>(kPairTileTokens, left);
      switch (tt) {
        case 1: pair_dot_tile<1>(pairs, npairs, gm, ldg, n0, am); break;
        case 2: pair_dot_tile<2>(pairs, npairs, gm, ldg, n0, am); break;
        default: pair_dot_tile<3>(pairs, npairs, gm, ldg, n0, am); break;
      }
      m0 += tt;
    }
  }
  for (int64_t m = 0; m < tokens; ++m)
    for (int i = 0; i < kPairChunk; ++i) out[m * cols + k0 + feature[i]] = acc[m * kPairChunk + i];
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
