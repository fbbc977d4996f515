// AVX2 fp32 vector helpers of the generic product paths (see vec_avx512.cpp).
#include "nf4/cpu/avx2.h"
#include "nf4/cpu/simd_avx2.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx2 {

PEFTX_AVX2 float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  float s = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

PEFTX_AVX2 void axpy(int nv, const float* c, const float* const* v, int64_t n, float* acc) {
  __m256 cv[4];
  for (int r = 0; r < nv; ++r) cv[r] = _mm256_set1_ps(c[r]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 s = _mm256_loadu_ps(acc + i);
    for (int r = 0; r < nv; ++r) s = _mm256_fmadd_ps(cv[r], _mm256_loadu_ps(v[r] + i), s);
    _mm256_storeu_ps(acc + i, s);
  }
  for (; i < n; ++i)
    for (int r = 0; r < nv; ++r) acc[i] += c[r] * v[r][i];
}

}  // namespace avx2
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
