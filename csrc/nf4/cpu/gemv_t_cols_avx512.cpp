// AVX-512 transposed product in fp32 (dx = g W of a 4-bit layer for fp32 / fp16 grads, any number of
// tokens): each task owns whole 128-feature chunks of dx and holds them in registers, 3 tokens at a
// time, while it walks all of W's rows, so dx is written once instead of read and written per row
// (gemv_t_avx512.cpp), and W is never materialised (the tiles + BLAS path, whose fp32 GEMM is the
// slower one here). bf16 grads take gemv_t_bf16_avx512.cpp, which multiplies by the bf16 weight.
// Decode: a row's 64 bytes of a chunk are one vector of 16 dwords; the s-th nibble of every dword
// (the vector shifted right by 4 s) indexes vpermps, which reads only an index's low 4 bits, so
// 8 shifts and 8 permutes give all 128 weights, exact fp32 code values, with no byte widening.
// Nibble s of dword d is element chunk_lane_element(s, d) = 8 d + (s ^ 1) of the chunk
// (simd_avx512.h), so accumulator s holds those features in lane d; the permutation is undone once
// per chunk when it is stored. Each row's weights are scaled per lane by g[m, n] * absmax of the
// lane's block (a lane's 8 features share a block: blocksize >= 8).
// Sums run over rows in order, one fp32 FMA per row: the result does not depend on the threads.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/scratch_vector.h"
#include "nf4/cpu/avx512.h"
#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {
namespace {

constexpr int64_t kChunk = kLaneChunk;  // features per chunk: 8 accumulators per token
constexpr int64_t kBlockRows = 32;  // rows per pass over a task's chunks (16 and 64 measured slower)

// Rows [n0, n1) of tokens [0, TT) of g (fp32, row stride ldg) times W's columns [k, k + CW * 128),
// added to acc_mem (TT x CW * 8 vectors, lanes as above); with `prefetch`, the same columns of the
// next block's rows are fetched into L1, a whole pass over the task's chunks ahead.
template <int TT, int CW>
PEFTX_AVX512 void rows_chunk(const Weight4& w, const float* g, int64_t ldg, int64_t n0, int64_t n1, int64_t k,
                             __m512* acc_mem, bool prefetch) {
  const int64_t K = w.cols;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const __m512 code = _mm512_loadu_ps(w.code);
  __m512 acc[TT][CW * 8];
#pragma GCC unroll 4
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 16
    for (int v = 0; v < CW * 8; ++v) acc[t][v] = acc_mem[t * CW * 8 + v];
  const int64_t row_bytes = K >> 1;
  const uint8_t* p = w.packed + n0 * row_bytes + (k >> 1);
  for (int64_t n = n0; n < n1; ++n, p += row_bytes) {
    if (prefetch)
      for (int c = 0; c < CW; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(p + kBlockRows * row_bytes + 64 * c), _MM_HINT_T0);
    const int64_t j = n * K + k;
#pragma GCC unroll 2
    for (int c = 0; c < CW; ++c) {
      const __m512 scale = chunk_lane_scales(w.absmax, j + kChunk * c, shift);
      __m512 gs[TT];
#pragma GCC unroll 4
      for (int t = 0; t < TT; ++t) gs[t] = _mm512_mul_ps(scale, _mm512_set1_ps(g[t * ldg + n]));
      const __m512i bytes = _mm512_loadu_si512(p + 64 * c);
#pragma GCC unroll 8
      for (int s = 0; s < 8; ++s) {
        const __m512 v = _mm512_permutexvar_ps(s == 0 ? bytes : _mm512_srli_epi32(bytes, 4 * s), code);
#pragma GCC unroll 4
        for (int t = 0; t < TT; ++t) acc[t][8 * c + s] = _mm512_fmadd_ps(v, gs[t], acc[t][8 * c + s]);
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 16
    for (int v = 0; v < CW * 8; ++v) acc_mem[t * CW * 8 + v] = acc[t][v];
}

// Tokens [0, TT) times columns [c0, c1) in units of CW chunks: rows in blocks of kBlockRows, and
// within a block every unit of the range, so each row's bytes of the range are read in order (a
// walk of all rows per chunk, lines K / 2 bytes apart, ran at half the speed). The accumulators
// live in acc between blocks.
template <int TT, int CW, typename T>
PEFTX_AVX512 void tile_cols(const Weight4& w, const float* g, int64_t ldg, int64_t c0, int64_t c1, T* out,
                            int64_t ldo, __m512* acc) {
  const int64_t N = w.rows;
  const int64_t units = (c1 - c0) / (CW * kChunk);
  for (int64_t i = 0; i < units * TT * CW * 8; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t n0 = 0; n0 < N; n0 += kBlockRows) {
    const int64_t n1 = std::min(N, n0 + kBlockRows);
    const bool prefetch = n1 + kBlockRows <= N;
    for (int64_t u = 0; u < units; ++u)
      rows_chunk<TT, CW>(w, g, ldg, n0, n1, c0 + u * CW * kChunk, acc + u * TT * CW * 8, prefetch);
  }
  for (int64_t u = 0; u < units; ++u)
    for (int t = 0; t < TT; ++t)
      for (int c = 0; c < CW; ++c) {
        alignas(64) float lanes[8][16];
        for (int s = 0; s < 8; ++s) _mm512_store_ps(lanes[s], acc[(u * TT + t) * CW * 8 + 8 * c + s]);
        T* o = out + t * ldo + c0 + (u * CW + c) * kChunk;
        for (int d = 0; d < 16; ++d)
          for (int s = 0; s < 8; ++s) store(o + chunk_lane_element(s, d), lanes[s][d]);
      }
}

template <typename T>
PEFTX_AVX512 void cols_range(const Weight4& w, const float* g, int64_t ldg, int64_t tokens, int64_t c0, int64_t c1,
                             T* out, int64_t ldo) {
  struct alignas(64) Vec {
    float lanes[16];
  };
  thread_local std::vector<Vec> acc_buf;
  __m512* acc = reinterpret_cast<__m512*>(scratch(acc_buf, static_cast<size_t>((c1 - c0) / kChunk * 3 * 8)));
  for (int64_t m0 = 0; m0 < tokens;) {
    // Tiles of 3 tokens (24 accumulators), ending 2 + 2 rather than 3 + 1; one token takes two
    // chunks a pass (16 accumulators: 8 would leave too few independent FMA chains).
    const int64_t left = tokens - m0;
    const int64_t tt = left == 4 ? 2 : std::min<int64_t>(3, left);
    const float* gm = g + m0 * ldg;
    T* om = out + m0 * ldo;
    if (tt == 1 && (c1 - c0) % (2 * kChunk) == 0) {
      tile_cols<1, 2>(w, gm, ldg, c0, c1, om, ldo, acc);
    } else if (tt == 1) {
      tile_cols<1, 1>(w, gm, ldg, c0, c1, om, ldo, acc);
    } else if (tt == 2) {
      tile_cols<2, 1>(w, gm, ldg, c0, c1, om, ldo, acc);
    } else {
      tile_cols<3, 1>(w, gm, ldg, c0, c1, om, ldo, acc);
    }
    m0 += tt;
  }
}

}  // namespace

PEFTX_AVX512 void gemv_t_cols(const Weight4& w, const float* g, int64_t ldg, int64_t tokens, int64_t c0, int64_t c1,
                              Dt out_dt, void* out, int64_t ldo) {
  switch (out_dt) {
    case Dt::kF32:
      return cols_range(w, g, ldg, tokens, c0, c1, static_cast<float*>(out), ldo);
    case Dt::kBF16:
      return cols_range(w, g, ldg, tokens, c0, c1, static_cast<bf16_t*>(out), ldo);
    case Dt::kF16:
      return cols_range(w, g, ldg, tokens, c0, c1, static_cast<f16_t*>(out), ldo);
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
