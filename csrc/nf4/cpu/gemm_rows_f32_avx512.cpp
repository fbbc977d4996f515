// AVX-512 product y = x W^T in fp32 for any number of tokens (fp32 / fp16 activations): W decoded in
// registers, never materialised, as in gemv_t_cols_avx512.cpp: a row's 128-feature chunk is one
// 64-byte load, and its s-th nibble vector (shifted right by 4 s) indexes vpermps, giving the
// weights of features 8 d + (s ^ 1) in lanes d, scaled per lane by the lane's block absmax (exactly
// code * absmax in fp32, the weight nf4_dequantize gives). x is laid out once per call in the same
// lane order (perm_x_f32), so each decoded vector meets its activations with plain loads.
// Register tile: 4 rows x 4 tokens (16 accumulators of 16 lane partial sums, reduced at the end),
// so each x vector loaded feeds 4 FMAs and each decoded vector 4. Tokens run in blocks of
// kBlockTokens whose x (128 KiB per 1024 features) stays in L2 while a task's rows stream past;
// a group's 4 rows (2 KiB per 1024 features) stay in L1 for the block's token tiles.
#include <algorithm>
#include <cstdint>

#include "nf4/cpu/avx512.h"
#include "nf4/cpu/simd_avx512.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {
namespace {

constexpr int64_t kChunk = kLaneChunk;
constexpr int kRows = 4, kTokens = 4;
constexpr int64_t kBlockTokens = 32;
constexpr int kPrefetchRows = 16;  // rows ahead (4 groups) fetched by a block's last token tile

// Rows o .. o + RW - 1 times tokens 0 .. TM - 1 of xp (lane layout, stride ldx): res[r * TM + m].
template <int RW, int TM>
PEFTX_AVX512 void tile(const Weight4& w, const float* xp, int64_t ldx, int64_t o, float* res, bool prefetch) {
  const int64_t K = w.cols;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const __m512 code = _mm512_loadu_ps(w.code);
  __m512 acc[RW][TM];
#pragma GCC unroll 4
  for (int r = 0; r < RW; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < TM; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint8_t* p = w.packed + ((o * K) >> 1);
  for (int64_t k = 0; k < K; k += kChunk) {
    __m512i bytes[RW];
    __m512 scale[RW];
#pragma GCC unroll 4
    for (int r = 0; r < RW; ++r) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(p + (((r + kPrefetchRows) * K + k) >> 1)), _MM_HINT_T0);
      bytes[r] = _mm512_loadu_si512(p + ((r * K + k) >> 1));
      scale[r] = chunk_lane_scales(w.absmax, (o + r) * K + k, shift);
    }
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      __m512 xv[TM];
#pragma GCC unroll 4
      for (int m = 0; m < TM; ++m) xv[m] = _mm512_loadu_ps(xp + m * ldx + k + 16 * s);
#pragma GCC unroll 4
      for (int r = 0; r < RW; ++r) {
        const __m512i idx = s == 0 ? bytes[r] : _mm512_srli_epi32(bytes[r], 4 * s);
        const __m512 wv = _mm512_mul_ps(_mm512_permutexvar_ps(idx, code), scale[r]);
#pragma GCC unroll 4
        for (int m = 0; m < TM; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RW; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < TM; ++m) res[r * TM + m] = _mm512_reduce_add_ps(acc[r][m]);
}

// tile<rw, tm> for run-time rw, tm in [1, 4].
template <int RW>
PEFTX_AVX512 void tile_n(int tm, const Weight4& w, const float* xp, int64_t ldx, int64_t o, float* res,
                         bool prefetch) {
  switch (tm) {
    case 1: return tile<RW, 1>(w, xp, ldx, o, res, prefetch);
    case 2: return tile<RW, 2>(w, xp, ldx, o, res, prefetch);
    case 3: return tile<RW, 3>(w, xp, ldx, o, res, prefetch);
    default: return tile<RW, 4>(w, xp, ldx, o, res, prefetch);
  }
}

template <typename T>
PEFTX_AVX512 void rows_range(const Weight4& w, const float* xp, int64_t ldx, int64_t tokens, int64_t o0, int64_t o1,
                             const float* bias, T* y, int64_t ldy) {
  float res[kRows * kTokens];
  for (int64_t b0 = 0; b0 < tokens; b0 += kBlockTokens) {
    const int64_t b1 = std::min(tokens, b0 + kBlockTokens);
    for (int64_t o = o0; o < o1; o += kRows) {
      const int rw = static_cast<int>(std::min<int64_t>(kRows, o1 - o));
      for (int64_t m0 = b0; m0 < b1; m0 += kTokens) {
        const int tm = static_cast<int>(std::min<int64_t>(kTokens, b1 - m0));
        const float* xm = xp + m0 * ldx;
        // The block's last token tile fetches the rows kPrefetchRows ahead (DRAM latency: a cold
        // 4096 x 4096 weight at 1 / 4 / 16 tokens took 0.35 / 0.68 / 1.9 ms without, 0.27 / 0.44 /
        // 1.55 with; 1 and 2 groups ahead were in between).
        const bool prefetch = m0 + kTokens >= b1 && o + kRows + kPrefetchRows <= o1;
        switch (rw) {
          case 1: tile_n<1>(tm, w, xm, ldx, o, res, prefetch); break;
          case 2: tile_n<2>(tm, w, xm, ldx, o, res, prefetch); break;
          case 3: tile_n<3>(tm, w, xm, ldx, o, res, prefetch); break;
          default: tile_n<4>(tm, w, xm, ldx, o, res, prefetch); break;
        }
        for (int r = 0; r < rw; ++r)
          for (int m = 0; m < tm; ++m) {
            const float v = res[r * tm + m];
            store(y + (m0 + m) * ldy + o + r, bias ? add_rn(v, bias[o + r]) : v);
          }
      }
    }
  }
}

// 128 values of one chunk in natural order -> lane order (element chunk_lane_element(s, d) at 16 s + d).
PEFTX_AVX512_INLINE void perm_chunk(const float* in, float* out) {
#pragma GCC unroll 8
  for (int s = 0; s < 8; ++s) {
    alignas(64) int32_t idx[16];
    for (int d = 0; d < 16; ++d) idx[d] = chunk_lane_element(s, d);
    _mm512_storeu_ps(out + 16 * s, _mm512_i32gather_ps(_mm512_load_si512(idx), in, 4));
  }
}

}  // namespace

PEFTX_AVX512 void perm_x_f32(const void* x, Dt dt, int64_t ldx_in, int64_t t0, int64_t t1, int64_t cols, float* out) {
  alignas(64) float buf[kChunk];
  for (int64_t m = t0; m < t1; ++m) {
    for (int64_t k = 0; k < cols; k += kChunk) {
      const float* src = buf;
      switch (dt) {
        case Dt::kF32:
          src = static_cast<const float*>(x) + m * ldx_in + k;
          break;
        case Dt::kBF16:
          for (int i = 0; i < kChunk; i += 16)
            _mm512_store_ps(buf + i, load16(static_cast<const bf16_t*>(x) + m * ldx_in + k + i));
          break;
        case Dt::kF16:
          for (int i = 0; i < kChunk; i += 16)
            _mm512_store_ps(buf + i, load16(static_cast<const f16_t*>(x) + m * ldx_in + k + i));
          break;
      }
      perm_chunk(src, out + m * cols + k);
    }
  }
}

PEFTX_AVX512 void gemm_rows_f32(const Weight4& w, const float* xp, int64_t tokens, int64_t o0, int64_t o1,
                                const float* bias, Dt out_dt, void* y, int64_t ldy) {
  switch (out_dt) {
    case Dt::kF32:
      return rows_range(w, xp, w.cols, tokens, o0, o1, bias, static_cast<float*>(y), ldy);
    case Dt::kBF16:
      return rows_range(w, xp, w.cols, tokens, o0, o1, bias, static_cast<bf16_t*>(y), ldy);
    case Dt::kF16:
      return rows_range(w, xp, w.cols, tokens, o0, o1, bias, static_cast<f16_t*>(y), ldy);
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
