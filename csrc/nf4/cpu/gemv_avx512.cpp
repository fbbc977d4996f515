// AVX-512 GEMV for few tokens: y[m, o] = sum_k x[m, k] W[o, k] (+ bias[o]), W never materialised.
// Each row's packed bytes are decoded in registers (nibble -> vpermps / vpermw on the 16-entry code
// table) and dotted with activations that were converted once into the chunk layout of GemvX
// (even features then odd features of each chunk, matching the high / low nibbles of a byte run).
// Requires cols % 32 == 0, so every 32-feature run of a row lies in one quantization block.
//   fp32 kernel (chunk 32): w = code * absmax exactly in fp32, FMA into fp32 accumulators.
//   bf16 kernel (chunk 64, avx512_bf16): where a 64-feature chunk lies in one block (blocksize >= 64,
//     cols % 64 == 0), the block's 16 dequantized values bf16(code * absmax) (exactly what
//     nf4_dequantize returns in bf16, up to denormals, which vdpbf16ps reads as zero) form the
//     vpermw table, and vdpbf16ps accumulates straight into fp32: W is decoded once per chunk for
//     2 rows x 8 tokens (kScaledTokens), from 3 tokens on; beyond 8 tokens, once per panel into an
//     L1 buffer (decode_scaled) that every tile reads.
//     Otherwise (and for 1-2 tokens) vdpbf16ps of bf16(code) with x, then one FMA by absmax per
//     32-feature half, 4 tokens a pass.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/scratch_vector.h"
#include "nf4/cpu/avx512.h"
#include "nf4/cpu/plan.h"
#include "nf4/cpu/simd_avx512.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {
namespace {

constexpr int kMaxTokens = 4;  // tokens per pass over a panel (accumulators: 4 * tokens registers)
constexpr int kScaledTokens = 8;  // tokens per pass of the scaled-table bf16 panel (2 rows x 8 accumulators)
constexpr int64_t kScaledMinTokens = 3;  // fewer tokens: the 4-token bf16 kernel is faster (0.28 vs 0.44 ms at 1)
constexpr int64_t kMaxGemvTokens = std::max(kGemvMaxTokens, kGemvBf16MaxTokens);

template <typename T>
void store_results(int tm, const float* res, int64_t m0, int64_t o, const float* bias, T* y, int64_t ldy) {
  for (int m = 0; m < tm; ++m) store(y + (m0 + m) * ldy + o, bias ? add_rn(res[m], bias[o]) : res[m]);
}

void store_results(Dt dt, int tm, const float* res, int64_t m0, int64_t o, const float* bias, void* y,
                   int64_t ldy) {
  switch (dt) {
    case Dt::kF32:
      return store_results(tm, res, m0, o, bias, static_cast<float*>(y), ldy);
    case Dt::kBF16:
      return store_results(tm, res, m0, o, bias, static_cast<bf16_t*>(y), ldy);
    case Dt::kF16:
      return store_results(tm, res, m0, o, bias, static_cast<f16_t*>(y), ldy);
  }
}

// --- fp32 activations ----------------------------------------------------------------------

// Features [k, k + 32) of one row: decode, scale, and FMA into acc[0..1][m] (hi / lo lanes).
template <int TM>
PEFTX_AVX512_INLINE void chunk_f32(const uint8_t* bytes, __m512 code, float scale, const float* x, int64_t stride,
                                   __m512 (&acc)[2][TM]) {
  __m512 hi, lo;
  decode32(load_bytes16(bytes), code, hi, lo);
  const __m512 s = _mm512_set1_ps(scale);
  hi = _mm512_mul_ps(hi, s);
  lo = _mm512_mul_ps(lo, s);
#pragma GCC unroll 4
  for (int m = 0; m < TM; ++m) {
    acc[0][m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + m * stride), acc[0][m]);
    acc[1][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + m * stride + 16), acc[1][m]);
  }
}

// Features [k0, k1) of row o for TM tokens; adds each token's partial sums to part[m].
template <int TM>
PEFTX_AVX512 void panel_f32(const Weight4& w, const float* x, int64_t stride, int64_t o, int64_t k0, int64_t k1,
                            __m512* part) {
  const int64_t j0 = o * w.cols;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const uint8_t* p = w.packed + (j0 >> 1);
  const __m512 code = _mm512_loadu_ps(w.code);
  // Two chunks per step into separate accumulators: four independent FMA chains per token.
  __m512 a[2][TM], b[2][TM];
  for (int m = 0; m < TM; ++m) a[0][m] = a[1][m] = b[0][m] = b[1][m] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 64 <= k1; k += 64) {
    chunk_f32<TM>(p + (k >> 1), code, w.absmax[(j0 + k) >> shift], x + k, stride, a);
    chunk_f32<TM>(p + (k >> 1) + 16, code, w.absmax[(j0 + k + 32) >> shift], x + k + 32, stride, b);
  }
  if (k < k1) chunk_f32<TM>(p + (k >> 1), code, w.absmax[(j0 + k) >> shift], x + k, stride, a);
  for (int m = 0; m < TM; ++m)
    part[m] = _mm512_add_ps(part[m], _mm512_add_ps(_mm512_add_ps(a[0][m], a[1][m]), _mm512_add_ps(b[0][m], b[1][m])));
}

// --- bf16 activations ----------------------------------------------------------------------

// 64 features from 32 packed bytes (`bytes` of them read, the rest 0): dot products of the high /
// low nibbles' bf16 codes with x's even / odd features, scaled per 32-feature half by `scale`.
template <int TM>
PEFTX_AVX512BF16 static inline __attribute__((always_inline)) void chunk_bf16(__m256i raw, __m512i code32,
                                                                               __m512 scale, const uint16_t* x,
                                                                               int64_t stride, __m512 (&acc)[2][TM]) {
  const __m512i idx = _mm512_cvtepu8_epi16(raw);
  const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(idx, 4), code32);
  const __m512i lo = _mm512_permutexvar_epi16(idx, code32);  // vpermw reads 5 bits: the table repeats
#pragma GCC unroll 4
  for (int m = 0; m < TM; ++m) {
    const __m512i xe = _mm512_loadu_si512(x + m * stride), xo = _mm512_loadu_si512(x + m * stride + 32);
    const __m512 de = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)hi, (__m512bh)xe);
    const __m512 dd = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo, (__m512bh)xo);
    acc[0][m] = _mm512_fmadd_ps(de, scale, acc[0][m]);
    acc[1][m] = _mm512_fmadd_ps(dd, scale, acc[1][m]);
  }
}

template <int TM>
PEFTX_AVX512BF16 void panel_bf16(const Weight4& w, const uint16_t* x, int64_t stride, __m512i code32, int64_t o,
                                 int64_t k0, int64_t k1, __m512* part) {
  const int64_t K = w.cols, j0 = o * K;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const uint8_t* p = w.packed + (j0 >> 1);
  // With blocksize >= 64 and cols % 64 == 0 a 64-feature chunk never crosses a block.
  const bool uniform = w.blocksize >= 64 && K % 64 == 0;
  __m512 a[2][TM], b[2][TM];
  for (int m = 0; m < TM; ++m) a[0][m] = a[1][m] = b[0][m] = b[1][m] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 128 <= k1; k += 128) {
    __m512 s0, s1;
    if (uniform) {
      s0 = _mm512_set1_ps(w.absmax[(j0 + k) >> shift]);
      s1 = _mm512_set1_ps(w.absmax[(j0 + k + 64) >> shift]);
    } else {
      s0 = _mm512_insertf32x8(_mm512_set1_ps(w.absmax[(j0 + k) >> shift]),
                              _mm256_set1_ps(w.absmax[(j0 + k + 32) >> shift]), 1);
      s1 = _mm512_insertf32x8(_mm512_set1_ps(w.absmax[(j0 + k + 64) >> shift]),
                              _mm256_set1_ps(w.absmax[(j0 + k + 96) >> shift]), 1);
    }
    chunk_bf16<TM>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (k >> 1))), code32, s0, x + k, stride, a);
    chunk_bf16<TM>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (k >> 1) + 32)), code32, s1, x + k + 64,
                   stride, b);
  }
  for (; k < k1; k += 64) {
    // The last one or two 64-feature chunks; a row's final 32-feature half reads 16 bytes and
    // pairs with x's zero padding.
    const int64_t bytes = std::min<int64_t>(32, (k1 - k) / 2);
    const float s_lo = w.absmax[(j0 + k) >> shift];
    const float s_hi = bytes == 32 ? w.absmax[(j0 + k + 32) >> shift] : s_lo;
    const __m512 s = _mm512_insertf32x8(_mm512_set1_ps(s_lo), _mm256_set1_ps(s_hi), 1);
    const __m256i raw = _mm256_maskz_loadu_epi8(static_cast<__mmask32>((uint64_t(1) << bytes) - 1u), p + (k >> 1));
    chunk_bf16<TM>(raw, code32, s, x + k, stride, a);
  }
  for (int m = 0; m < TM; ++m)
    part[m] = _mm512_add_ps(part[m], _mm512_add_ps(_mm512_add_ps(a[0][m], a[1][m]), _mm512_add_ps(b[0][m], b[1][m])));
}

// Rows o .. o + RW - 1, features [k0, k1) (whole 64-feature chunks, each in one block), decoded to
// bf16 through the block's scaled table: dec[c * 2 RW + 2 r] holds the high nibbles' (even features')
// weights of chunk c of row r and dec[c * 2 RW + 2 r + 1] the low nibbles' (odd features'). A pass of
// its own: the table's multiply-round-permute chain is long, and inside the dot-product loop below
// it serialized the loop's iterations (34 cycles per 32 dot products on Zen 5, against 16 for the
// products alone); here it has no loop-carried dependency, and M > 8 tokens reuse it.
// It also prefetches these rows' next panel (P features on; past the last panel, the rows
// next_group_rows on, where the next group starts), one line per 2 chunks: spread over the panel's work, where one
// burst per panel for the whole group left the weight's DRAM latency exposed (0.3-0.4 ms of a 1 ms
// 16-token forward after another layer's GEMM had evicted it).
template <int RW>
PEFTX_AVX512BF16 void decode_scaled(const Weight4& w, __m512 code, int64_t o, int64_t k0, int64_t k1, int64_t P,
                                    int64_t next_group_rows, __m512i* dec) {
  const int64_t K = w.cols, j0 = o * K, total = w.rows * K;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const uint8_t* p = w.packed + (j0 >> 1);
  // Element offset from feature k of a row to the same place in its next panel.
  const int64_t ahead = k1 < K ? P : next_group_rows * K - k0;
  for (int64_t k = k0; k < k1; k += 64, dec += 2 * RW) {
    if ((k - k0) % 128 == 0) {
      for (int r = 0; r < RW; ++r) {
        const int64_t next = j0 + r * K + k + ahead;
        if (next < total) _mm_prefetch(reinterpret_cast<const char*>(w.packed + (next >> 1)), _MM_HINT_T0);
      }
    }
    for (int r = 0; r < RW; ++r) {
      const __m512i table = bf16_block_table_cvt(code, w.absmax[(j0 + r * K + k) >> shift]);
      const __m512i idx =
          _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + ((r * K + k) >> 1))));
      _mm512_store_si512(dec + 2 * r, _mm512_permutexvar_epi16(_mm512_srli_epi16(idx, 4), table));
      _mm512_store_si512(dec + 2 * r + 1, _mm512_permutexvar_epi16(idx, table));
    }
  }
}

// `chunks` decoded chunks of RW rows (decode_scaled) times TM tokens: one accumulator per row and
// token (even then odd features into the same lanes). Each x vector loaded feeds RW dot products
// (RW = 2, TM = 8 measured fastest of 1x16, 2x8, 2x12, 3x8, 4x4, 4x5, 4x6 on the 2-core Zen 5
// machine; 1 x load per dot product ran at about a third of vdpbf16ps' register-operand rate).
// x is token-interleaved per chunk (x[c * TM * 64 + m * 64 + i], see tile_x): one base pointer and
// constant offsets, so the token streams need no general-purpose registers.
// part holds row r's token m at part[r * ldp + m].
template <int TM, int RW>
PEFTX_AVX512BF16 void panel_bf16_scaled(const __m512i* dec, const uint16_t* x, int64_t chunks, __m512* part,
                                        int64_t ldp) {
  __m512 acc[RW][TM];
#pragma GCC unroll 4
  for (int r = 0; r < RW; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < TM; ++m) acc[r][m] = part[r * ldp + m];
  for (int64_t c = 0; c < chunks; ++c, dec += 2 * RW, x += TM * 64) {
    __m512bh hi[RW], lo[RW];
#pragma GCC unroll 4
    for (int r = 0; r < RW; ++r) {
      hi[r] = (__m512bh)_mm512_load_si512(dec + 2 * r);
      lo[r] = (__m512bh)_mm512_load_si512(dec + 2 * r + 1);
    }
#pragma GCC unroll 16
    for (int m = 0; m < TM; ++m) {
      const __m512bh xe = (__m512bh)_mm512_loadu_si512(x + m * 64);
#pragma GCC unroll 4
      for (int r = 0; r < RW; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], hi[r], xe);
      const __m512bh xo = (__m512bh)_mm512_loadu_si512(x + m * 64 + 32);
#pragma GCC unroll 4
      for (int r = 0; r < RW; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], lo[r], xo);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RW; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < TM; ++m) part[r * ldp + m] = acc[r][m];
}

// Up to kScaledTokens tokens (one tile): panel_bf16_scaled with each chunk's decode inside the
// loop (features [k0, k1) of rows o .. o + RW - 1; x as there, x[(k / 64) * TM * 64 + m * 64 + i]).
// For one tile this beats the separate decode pass (its stores and loads cost more than the
// serialization they avoid: 0.16 vs 0.25 ms for 4 tokens x 1024 rows, one thread).
template <int TM, int RW>
PEFTX_AVX512BF16 void panel_bf16_fused(const Weight4& w, const uint16_t* x, __m512 code, int64_t o, int64_t k0,
                                        int64_t k1, __m512* part, int64_t ldp) {
  const int64_t K = w.cols, j0 = o * K;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const uint8_t* p = w.packed + (j0 >> 1);
  __m512 acc[RW][TM];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < TM; ++m) acc[r][m] = part[r * ldp + m];
  for (int64_t k = k0; k < k1; k += 64) {
    __m512bh hi[RW], lo[RW];
    for (int r = 0; r < RW; ++r) {
      const __m512i table = bf16_block_table_cvt(code, w.absmax[(j0 + r * K + k) >> shift]);
      const __m512i idx =
          _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + ((r * K + k) >> 1))));
      hi[r] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(idx, 4), table);
      lo[r] = (__m512bh)_mm512_permutexvar_epi16(idx, table);
    }
    const uint16_t* xk = x + (k >> 6) * (TM * 64);
#pragma GCC unroll 16
    for (int m = 0; m < TM; ++m) {
      const __m512bh xe = (__m512bh)_mm512_loadu_si512(xk + m * 64);
      for (int r = 0; r < RW; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], hi[r], xe);
      const __m512bh xo = (__m512bh)_mm512_loadu_si512(xk + m * 64 + 32);
      for (int r = 0; r < RW; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], lo[r], xo);
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < TM; ++m) part[r * ldp + m] = acc[r][m];
}

// Copies tokens [m0, m0 + tm) of x (GemvX chunk-64 layout, `chunks` chunks) token-interleaved per
// chunk into out: out[c * tm * 64 + m * 64 + i] = x[(m0 + m) * stride + c * 64 + i].
void tile_x(const uint16_t* x, int64_t stride, int64_t m0, int64_t tm, int64_t chunks, uint16_t* out) {
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t m = 0; m < tm; ++m)
      std::memcpy(out + (c * tm + m) * 64, x + (m0 + m) * stride + c * 64, 64 * sizeof(uint16_t));
}

// panel_bf16_scaled<tm, rw> for a run-time tm in [1, TM] and rw in {1, 2}.
template <int TM>
PEFTX_AVX512BF16 void panel_bf16_scaled_n(int tm, int rw, const __m512i* dec, const uint16_t* x, int64_t chunks,
                                          __m512* part, int64_t ldp) {
  if (tm == TM) {
    if (rw == 2) return panel_bf16_scaled<TM, 2>(dec, x, chunks, part, ldp);
    return panel_bf16_scaled<TM, 1>(dec, x, chunks, part, ldp);
  }
  if constexpr (TM > 1) panel_bf16_scaled_n<TM - 1>(tm, rw, dec, x, chunks, part, ldp);
}

// panel_bf16_fused<tm, rw> for a run-time tm in [1, TM] and rw in {1, 2}.
template <int TM>
PEFTX_AVX512BF16 void panel_bf16_fused_n(int tm, int rw, const Weight4& w, const uint16_t* x, __m512 code, int64_t o,
                                          int64_t k0, int64_t k1, __m512* part, int64_t ldp) {
  if (tm == TM) {
    if (rw == 2) return panel_bf16_fused<TM, 2>(w, x, code, o, k0, k1, part, ldp);
    return panel_bf16_fused<TM, 1>(w, x, code, o, k0, k1, part, ldp);
  }
  if constexpr (TM > 1) panel_bf16_fused_n<TM - 1>(tm, rw, w, x, code, o, k0, k1, part, ldp);
}

// Loop order of both kernels: groups of kGroupRows rows; for each, panels of the features whose
// activations (all tokens) fit in L1; for each row of the group and each tile of up to kMaxTokens
// tokens, the panel's partial sums. So W streams from memory once, x is read from L1, and the
// partial sums of a group (kGroupRows x tokens vectors) stay in L1 too.
constexpr int kGroupRows = 8;
constexpr int64_t kPanelBytes = 32 << 10;

int64_t panel_features(int64_t cols, int64_t tokens, int64_t elem) {
  const int64_t p = std::max<int64_t>(256, kPanelBytes / (tokens * elem) / 64 * 64);
  return p >= cols ? cols : p;
}

template <typename PanelFn>
PEFTX_AVX512 void rows_panelled(const Weight4& w, const GemvX& x, int64_t o0, int64_t o1, const float* bias,
                                Dt out_dt, void* y, int64_t ldy, int tile_tokens, int rows_per_call,
                                PanelFn&& panel, bool prefetch = true) {
  const int64_t M = x.tokens, K = w.cols;
  const int64_t P = panel_features(K, M, x.bf16 ? 2 : 4);
  alignas(64) __m512 part[kGroupRows * kMaxGemvTokens];
  for (int64_t og = o0; og < o1; og += kGroupRows) {
    const int64_t nr = std::min<int64_t>(kGroupRows, o1 - og);
    for (int64_t i = 0; i < nr * M; ++i) part[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += P) {
      const int64_t k1 = std::min(K, k0 + P);
      for (int64_t r = 0; r < nr; ++r) {
        // Short strided runs (P / 2 bytes of each row) escape the hardware prefetcher: fetch the
        // row's next panel (or, after the last panel, the next group's first) one panel ahead.
        if (prefetch && P < K) {
          const int64_t next = k1 < K ? (og + r) * K + k1 : (og + kGroupRows + r) * K;
          const int64_t end = std::min(next + P, w.rows * K);
          for (int64_t j = next; j < end; j += 128) _mm_prefetch(reinterpret_cast<const char*>(w.packed + j / 2), _MM_HINT_T1);
        }
      }
      for (int64_t r = 0; r < nr; r += rows_per_call) {
        const int rows = static_cast<int>(std::min<int64_t>(rows_per_call, nr - r));
        for (int64_t m0 = 0; m0 < M; m0 += tile_tokens) panel(og + r, rows, m0, k0, k1, part + r * M + m0);
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      float res[kMaxGemvTokens];
      for (int64_t m = 0; m < M; ++m) res[m] = _mm512_reduce_add_ps(part[r * M + m]);
      store_results(out_dt, static_cast<int>(M), res, 0, og + r, bias, y, ldy);
    }
  }
}

}  // namespace

PEFTX_AVX512 void gemv_rows_f32(const Weight4& w, const GemvX& x, int64_t o0, int64_t o1, const float* bias,
                                Dt out_dt, void* y, int64_t ldy) {
  const float* xp = static_cast<const float*>(x.data);
  const int64_t stride = x.stride, M = x.tokens;
  rows_panelled(w, x, o0, o1, bias, out_dt, y, ldy, kMaxTokens, 1,
                [&](int64_t o, int /*rows*/, int64_t m0, int64_t k0, int64_t k1, __m512* part) {
    const float* xm = xp + m0 * stride;
    switch (std::min<int64_t>(kMaxTokens, M - m0)) {
      case 1: return panel_f32<1>(w, xm, stride, o, k0, k1, part);
      case 2: return panel_f32<2>(w, xm, stride, o, k0, k1, part);
      case 3: return panel_f32<3>(w, xm, stride, o, k0, k1, part);
      default: return panel_f32<4>(w, xm, stride, o, k0, k1, part);
    }
  });
}

PEFTX_AVX512BF16 void gemv_rows_bf16(const Weight4& w, const GemvX& x, int64_t o0, int64_t o1, const float* bias,
                                     Dt out_dt, void* y, int64_t ldy) {
  alignas(64) uint16_t table[32];
  for (int i = 0; i < 32; ++i) table[i] = bf16_from_float(w.code[i & 15]).bits;
  const __m512i code32 = _mm512_load_si512(table);
  const uint16_t* xp = static_cast<const uint16_t*>(x.data);
  const int64_t stride = x.stride, M = x.tokens;
  // One or two tokens: the 4-token kernel below re-decodes nothing and builds no tables.
  if (w.blocksize >= 64 && w.cols % 64 == 0 && M >= kScaledMinTokens) {
    // Each call (one per thread) re-tiles x: M * cols * 2 bytes, small next to the rows' W.
    const int64_t chunks = w.cols / 64;
    thread_local std::vector<uint16_t> tiled_buf;
    uint16_t* const tiled = scratch(tiled_buf, static_cast<size_t>(M * chunks * 64));
    for (int64_t m0 = 0; m0 < M; m0 += kScaledTokens)
      tile_x(xp, stride, m0, std::min<int64_t>(kScaledTokens, M - m0), chunks, tiled + m0 * chunks * 64);
    const __m512 code = _mm512_loadu_ps(w.code);
    if (M <= kScaledTokens) {
      rows_panelled(w, x, o0, o1, bias, out_dt, y, ldy, kScaledTokens, 2,
                    [&](int64_t o, int rows, int64_t m0, int64_t k0, int64_t k1, __m512* part) {
        const int tm = static_cast<int>(std::min<int64_t>(kScaledTokens, M - m0));
        panel_bf16_fused_n<kScaledTokens>(tm, rows, w, tiled + m0 * chunks * 64, code, o, k0, k1, part, M);
      });
      return;
    }
    // A panel's rows decoded once (decode_scaled), for every tile of kScaledTokens tokens.
    struct alignas(64) Vec {
      uint16_t lanes[32];
    };
    const int64_t P = panel_features(w.cols, M, 2);  // rows_panelled's panel width
    thread_local std::vector<Vec> dec_buf;
    __m512i* dec = reinterpret_cast<__m512i*>(scratch(dec_buf, static_cast<size_t>(P / 64 * 4)));
    rows_panelled(w, x, o0, o1, bias, out_dt, y, ldy, static_cast<int>(M), 2,
                  [&](int64_t o, int rows, int64_t /*m0 = 0: all tokens*/, int64_t k0, int64_t k1, __m512* part) {
      if (rows == 2) {
        decode_scaled<2>(w, code, o, k0, k1, P, kGroupRows, dec);
      } else {
        decode_scaled<1>(w, code, o, k0, k1, P, kGroupRows, dec);
      }
      for (int64_t m0 = 0; m0 < M; m0 += kScaledTokens) {
        const int tm = static_cast<int>(std::min<int64_t>(kScaledTokens, M - m0));
        const uint16_t* xt = tiled + m0 * chunks * 64 + (k0 / 64) * tm * 64;
        panel_bf16_scaled_n<kScaledTokens>(tm, rows, dec, xt, (k1 - k0) / 64, part + m0, M);
      }
    }, /*prefetch=*/false);  // decode_scaled prefetches
    return;
  }
  rows_panelled(w, x, o0, o1, bias, out_dt, y, ldy, kMaxTokens, 1,
                [&](int64_t o, int /*rows*/, int64_t m0, int64_t k0, int64_t k1, __m512* part) {
    const uint16_t* xm = xp + m0 * stride;
    switch (std::min<int64_t>(kMaxTokens, M - m0)) {
      case 1: return panel_bf16<1>(w, xm, stride, code32, o, k0, k1, part);
      case 2: return panel_bf16<2>(w, xm, stride, code32, o, k0, k1, part);
      case 3: return panel_bf16<3>(w, xm, stride, code32, o, k0, k1, part);
      default: return panel_bf16<4>(w, xm, stride, code32, o, k0, k1, part);
    }
  });
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
