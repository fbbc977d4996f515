// AVX-512 fp32 vector helpers of the generic product paths: dot (GEMV rows whose shape the fused
// kernel does not take) and axpy (the transposed product, which accumulates decoded rows).
#include <algorithm>

#include "nf4/cpu/avx512.h"
#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {

PEFTX_AVX512 float dot(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    const int64_t c = std::min<int64_t>(16, n - i);
    s0 = _mm512_fmadd_ps(load16(a + i, c), load16(b + i, c), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

PEFTX_AVX512 void axpy(int nv, const float* c, const float* const* v, int64_t n, float* acc) {
  __m512 cv[4];
  for (int r = 0; r < nv; ++r) cv[r] = _mm512_set1_ps(c[r]);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t cnt = std::min<int64_t>(16, n - i);
    const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1u);
    __m512 s = _mm512_maskz_loadu_ps(m, acc + i);
    for (int r = 0; r < nv; ++r) s = _mm512_fmadd_ps(cv[r], _mm512_maskz_loadu_ps(m, v[r] + i), s);
    _mm512_mask_storeu_ps(acc + i, m, s);
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
