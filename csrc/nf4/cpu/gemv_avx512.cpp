// AVX-512 GEMV for few tokens: y[m, o] = sum_k x[m, k] W[o, k] (+ bias[o]), W never materialised.
// Each row's packed bytes are decoded in registers (nibble -> vpermps / vpermw on the 16-entry code
// table) and dotted with activations that were converted once into the chunk layout of GemvX
// (even features then odd features of each chunk, matching the high / low nibbles of a byte run).
// Requires cols % 32 == 0, so every 32-feature run of a row lies in one quantization block.
//   fp32 kernel (chunk 32): w = code * absmax exactly in fp32, FMA into fp32 accumulators.
//   bf16 kernel (chunk 64, avx512_bf16): vdpbf16ps of bf16(code) with bf16 x into fp32 lanes, then
//     one FMA by absmax per 64 features (lanes 0-7 hold features 0-31, lanes 8-15 features 32-63).
#include <algorithm>

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
constexpr int64_t kMaxGemvTokens = kGemvMaxTokens;

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
                                Dt out_dt, void* y, int64_t ldy, PanelFn&& panel) {
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
        if (P < K) {
          const int64_t next = k1 < K ? (og + r) * K + k1 : (og + kGroupRows + r) * K;
          const int64_t end = std::min(next + P, w.rows * K);
          for (int64_t j = next; j < end; j += 128) _mm_prefetch(reinterpret_cast<const char*>(w.packed + j / 2), _MM_HINT_T0);
        }
        for (int64_t m0 = 0; m0 < M; m0 += kMaxTokens) panel(og + r, m0, k0, k1, part + r * M + m0);
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
  rows_panelled(w, x, o0, o1, bias, out_dt, y, ldy, [&](int64_t o, int64_t m0, int64_t k0, int64_t k1, __m512* part) {
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
  rows_panelled(w, x, o0, o1, bias, out_dt, y, ldy, [&](int64_t o, int64_t m0, int64_t k0, int64_t k1, __m512* part) {
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
