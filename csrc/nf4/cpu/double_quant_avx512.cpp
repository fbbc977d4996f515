// AVX-512 double quantization of absmax (bitsandbytes' CPU 8-bit blockwise quantizer), bit-identical
// to nf4_math.h's quantize8_block / encode8: the same fp32 operations on 16 lanes (scale, clamp,
// snap to the 16-bit grid with one FMA, back to [-1, 1]), then the number of code midpoints below
// the snapped value by an 8-step branch-free binary search with gathers from the 255 midpoints.
#include <algorithm>

#include "nf4/cpu/avx512.h"
#include "nf4/cpu/simd_avx512.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {
namespace {

PEFTX_AVX512_INLINE __m512i encode16(__m512 t, const float* mids) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 g = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_add_ps(t, one), _mm512_set1_ps(0.5f)),
                                   _mm512_set1_ps(65535.0f), _mm512_set1_ps(0.5f));
  const __m512i c = _mm512_and_si512(_mm512_cvttps_epi32(g), _mm512_set1_epi32(0xffff));
  const __m512 fc = _mm512_cvtepi32_ps(c);
  const __m512 v = _mm512_sub_ps(_mm512_div_ps(_mm512_add_ps(fc, fc), _mm512_set1_ps(65535.0f)), one);
  // Largest q in [0, 255] with mids[q - 1] < v.
  __m512i q = _mm512_setzero_si512();
  for (int step = 128; step >= 1; step >>= 1) {
    const __m512i cand = _mm512_add_epi32(q, _mm512_set1_epi32(step));
    const __m512 th = _mm512_i32gather_ps(_mm512_sub_epi32(cand, _mm512_set1_epi32(1)), mids, 4);
    q = _mm512_mask_mov_epi32(q, _mm512_cmp_ps_mask(th, v, _CMP_LT_OQ), cand);
  }
  return q;
}

}  // namespace

PEFTX_AVX512 void double_quantize_blocks(const float* x, int64_t n, int64_t blocksize, const float* code,
                                         int64_t b0, int64_t b1, uint8_t* q, float* absmax) {
  float mids[255];
  for (int i = 0; i < 255; ++i) mids[i] = mul_rn(add_rn(code[i], code[i + 1]), 0.5f);
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
    __m512 m = _mm512_setzero_ps();
    for (int64_t j = begin; j < end; j += 16)
      // |x| first: vmaxps returns its second operand when one is NaN, so NaN inputs are skipped
      // as the scalar `m > amax` skips them.
      m = _mm512_max_ps(
          _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(load16(x + j, std::min<int64_t>(16, end - j))), magnitude)),
          m);
    const float amax = _mm512_reduce_max_ps(m);
    absmax[b] = amax;
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? div_rn(1.0f, amax) : 0.0f);
    for (int64_t j = begin; j < end; j += 16) {
      const int64_t count = std::min<int64_t>(16, end - j);
      const __mmask16 k = static_cast<__mmask16>((1u << count) - 1u);
      __m512i idx = _mm512_setzero_si512();
      if (amax > 0.0f) {
        const __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), inv);
        idx = encode16(_mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f)), mids);
      }
      _mm_mask_storeu_epi8(q + j, k, _mm512_cvtepi32_epi8(idx));
    }
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
