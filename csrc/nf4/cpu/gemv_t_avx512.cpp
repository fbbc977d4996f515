// AVX-512 transposed GEMV (the input gradient for few tokens): acc[m, :] += sum_o g[m, o] W[o, :]
// over a range of rows, W decoded in registers (as in gemv_avx512.cpp) and scaled by
// g[m, o] * absmax in fp32. acc is in the GemvX chunk-32 layout (per 32 features: the 16 even
// ones, then the 16 odd ones: the order in which 16 packed bytes decode), so no shuffles are
// needed; the caller restores the natural order once. Requires cols % 32 == 0.
#include "nf4/cpu/avx512.h"
#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {

PEFTX_AVX512 void gemv_t_rows(const Weight4& w, const float* g, int64_t ldg, int64_t tokens, int64_t o0, int64_t o1,
                              float* acc) {
  const int64_t K = w.cols;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const __m512 code = _mm512_loadu_ps(w.code);
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t j0 = o * K;
    const uint8_t* p = w.packed + (j0 >> 1);
    for (int64_t k = 0; k < K; k += 32) {
      __m512 hi, lo;
      decode32(load_bytes16(p + (k >> 1)), code, hi, lo);
      const float a = w.absmax[(j0 + k) >> shift];
      for (int64_t m = 0; m < tokens; ++m) {
        const __m512 c = _mm512_set1_ps(g[m * ldg + o] * a);
        float* dst = acc + m * K + k;
        _mm512_storeu_ps(dst, _mm512_fmadd_ps(hi, c, _mm512_loadu_ps(dst)));
        _mm512_storeu_ps(dst + 16, _mm512_fmadd_ps(lo, c, _mm512_loadu_ps(dst + 16)));
      }
    }
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
