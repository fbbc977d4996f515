// AVX2 GEMV for few tokens (fp32 activations, GemvX chunk 16): each row's packed bytes decode in
// registers (two 8-entry vpermps + blend per nibble), scale by absmax in fp32 and FMA with x.
// Requires cols % 32 == 0 (every 16-feature chunk lies in one block).
#include <algorithm>

#include "nf4/cpu/avx2.h"
#include "nf4/cpu/simd_avx2.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx2 {
namespace {

constexpr int kMaxTokens = 2;  // 16 ymm registers: 4 accumulators per token plus the decode

template <int TM>
PEFTX_AVX2_INLINE void chunk(const uint8_t* bytes, const Code16& code, float scale, const float* x, int64_t stride,
                             __m256 (&acc)[2][TM]) {
  __m256 hi, lo;
  decode16(bytes, code, hi, lo);
  const __m256 s = _mm256_set1_ps(scale);
  hi = _mm256_mul_ps(hi, s);
  lo = _mm256_mul_ps(lo, s);
  for (int m = 0; m < TM; ++m) {
    acc[0][m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * stride), acc[0][m]);
    acc[1][m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * stride + 8), acc[1][m]);
  }
}

template <typename T>
void store_results(int tm, const float* res, int64_t m0, int64_t o, const float* bias, T* y, int64_t ldy) {
  for (int m = 0; m < tm; ++m) store(y + (m0 + m) * ldy + o, bias ? add_rn(res[m], bias[o]) : res[m]);
}

// Row o for tokens [m0, m0 + TM).
template <int TM>
PEFTX_AVX2 void row(const Weight4& w, const GemvX& x, int64_t m0, int64_t o, const float* bias, Dt out_dt, void* y,
                    int64_t ldy) {
  const int64_t K = w.cols, j0 = o * K;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const Code16 code = load_code(w.code);
  const float* xp = static_cast<const float*>(x.data) + m0 * x.stride;
  const uint8_t* p = w.packed + (j0 >> 1);
  __m256 a[2][TM], b[2][TM];
  for (int m = 0; m < TM; ++m) a[0][m] = a[1][m] = b[0][m] = b[1][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {  // cols % 32 == 0
    chunk<TM>(p + (k >> 1), code, w.absmax[(j0 + k) >> shift], xp + k, x.stride, a);
    chunk<TM>(p + (k >> 1) + 8, code, w.absmax[(j0 + k + 16) >> shift], xp + k + 16, x.stride, b);
  }
  float res[TM];
  for (int m = 0; m < TM; ++m)
    res[m] = hsum(_mm256_add_ps(_mm256_add_ps(a[0][m], a[1][m]), _mm256_add_ps(b[0][m], b[1][m])));
  switch (out_dt) {
    case Dt::kF32: store_results(TM, res, m0, o, bias, static_cast<float*>(y), ldy); break;
    case Dt::kBF16: store_results(TM, res, m0, o, bias, static_cast<bf16_t*>(y), ldy); break;
    case Dt::kF16: store_results(TM, res, m0, o, bias, static_cast<f16_t*>(y), ldy); break;
  }
}

}  // namespace

// Rows outer, token tiles inner: each row's bytes come from memory once and from L1 for the
// other tiles.
void gemv_rows_f32(const Weight4& w, const GemvX& x, int64_t o0, int64_t o1, const float* bias, Dt out_dt, void* y,
                   int64_t ldy) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t m0 = 0; m0 < x.tokens; m0 += kMaxTokens) {
      if (x.tokens - m0 >= 2) {
        row<2>(w, x, m0, o, bias, out_dt, y, ldy);
      } else {
        row<1>(w, x, m0, o, bias, out_dt, y, ldy);
      }
    }
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
