// AVX2 NF4 quantization, byte-equal to nf4_math.h's quantize_block: the same method as
// quantize_avx512.cpp (integer max of sign-cleared bits; x * (1 / absmax); clamp; a 4-step binary
// search over the midpoints, here with 8-entry tables per step) on 8 lanes.
#include <type_traits>

#include "nf4/cpu/avx2.h"
#include "nf4/cpu/dt_dispatch.h"
#include "nf4/cpu/simd_avx2.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx2 {
namespace {

// Thresholds of the search steps: after the steps above it, q is a multiple of 2 * step and the
// next threshold is midpoint[q + step - 1], i.e. table[q / (2 * step)].
struct Search {
  __m256 t8, t4, t2, t1;
};

PEFTX_AVX2_INLINE __m256i encode8(__m256 s, const Search& m) {
  __m256i q = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, m.t8, _CMP_GT_OQ)), _mm256_set1_epi32(8));
  __m256 th = _mm256_permutevar8x32_ps(m.t4, _mm256_srli_epi32(q, 3));
  q = _mm256_add_epi32(q, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, th, _CMP_GT_OQ)), _mm256_set1_epi32(4)));
  th = _mm256_permutevar8x32_ps(m.t2, _mm256_srli_epi32(q, 2));
  q = _mm256_add_epi32(q, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, th, _CMP_GT_OQ)), _mm256_set1_epi32(2)));
  th = _mm256_permutevar8x32_ps(m.t1, _mm256_srli_epi32(q, 1));
  return _mm256_add_epi32(q, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, th, _CMP_GT_OQ)), _mm256_set1_epi32(1)));
}

// 8 indices -> 4 bytes (element 2i in the high nibble).
PEFTX_AVX2_INLINE uint32_t pack4(__m256i q) {
  const __m256i b = _mm256_or_si256(_mm256_slli_epi64(q, 4), _mm256_srli_epi64(q, 32));
  const __m256i sel = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                       0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i g = _mm256_shuffle_epi8(b, sel);
  return static_cast<uint32_t>(_mm256_extract_epi16(g, 0)) | (static_cast<uint32_t>(_mm256_extract_epi16(g, 8)) << 16);
}

PEFTX_AVX2_INLINE __m256 clamp_scale(__m256 v, __m256 inv) {
  const __m256 s = _mm256_mul_ps(v, inv);
  return _mm256_min_ps(_mm256_max_ps(s, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f));
}

template <typename T>
PEFTX_AVX2 void quantize_full_block(const T* src, int64_t blocksize, const Search& search, uint8_t* packed,
                                    float* absmax) {
  __m256i m = _mm256_setzero_si256();
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  for (int64_t i = 0; i < blocksize; i += 8)
    m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(load8(src + i)), magnitude));
  __m128i r = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0x4e));
  r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0xb1));
  const float amax = bits_float(static_cast<uint32_t>(_mm_cvtsi128_si32(r)));
  *absmax = amax;
  const float floored = amax > kAbsmaxFloor ? amax : kAbsmaxFloor;
  const __m256 inv = _mm256_set1_ps(div_rn(1.0f, floored));
  for (int64_t i = 0; i < blocksize; i += 8) {
    const uint32_t bytes = pack4(encode8(clamp_scale(load8(src + i), inv), search));
    __builtin_memcpy(packed + i / 2, &bytes, 4);
  }
}

template <typename T>
PEFTX_AVX2 void quantize_t(const T* w, int64_t n, int64_t blocksize, int64_t b0, int64_t b1, uint8_t* packed,
                           float* absmax) {
  float t4[8] = {kMidpoints[3], kMidpoints[11]}, t2[8], t1[8];
  for (int i = 0; i < 4; ++i) t2[i] = kMidpoints[4 * i + 1];
  for (int i = 0; i < 8; ++i) t1[i] = kMidpoints[2 * i];
  for (int i = 4; i < 8; ++i) t2[i] = 0.0f;
  const Search search{_mm256_set1_ps(kMidpoints[7]), _mm256_loadu_ps(t4), _mm256_loadu_ps(t2), _mm256_loadu_ps(t1)};
  for (int64_t b = b0; b < b1; ++b) {
    if ((b + 1) * blocksize <= n) {
      quantize_full_block(w + b * blocksize, blocksize, search, packed + b * blocksize / 2, absmax + b);
    } else {
      quantize_block(b, w, n, blocksize, packed, absmax);
    }
  }
}

}  // namespace

void quantize_blocks(Dt dt, const void* w, int64_t n, int64_t blocksize, int64_t b0, int64_t b1, uint8_t* packed,
                     float* absmax) {
  with_dt(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_t(static_cast<const T*>(w), n, blocksize, b0, b1, packed, absmax);
  });
}

}  // namespace avx2
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
