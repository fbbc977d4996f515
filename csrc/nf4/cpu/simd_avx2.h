// AVX2 building blocks of the NF4 CPU kernels (AVX2 + FMA + F16C). Functions using them carry
// PEFTX_AVX2; the files are compiled for the baseline ISA (see simd_avx512.h).
#pragma once

// GCC 12 reports -W(maybe-)uninitialized inside the intrinsic headers (the __Y of _mm*_undefined
// in masked / zero-extending intrinsics, GCC bug 105593): the warning state at the header's lines
// decides, so it is turned off before the include.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cstdint>

#include "common/host_device.h"

#define PEFTX_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))
#define PEFTX_AVX2_INLINE PEFTX_AVX2 static inline __attribute__((always_inline))

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx2 {

PEFTX_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PEFTX_AVX2_INLINE __m256 load8(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
PEFTX_AVX2_INLINE __m256 load8(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The 16-entry code table as two 8-entry halves; vpermps reads 3 index bits, bit 3 picks the half.
struct Code16 {
  __m256 lo, hi;
};
PEFTX_AVX2_INLINE Code16 load_code(const float* code) { return {_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)}; }
// code[idx & 15] for idx < 256 in each dword (bit 3 moved to the sign bit selects the half).
PEFTX_AVX2_INLINE __m256 lookup(const Code16& c, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(c.lo, idx), b = _mm256_permutevar8x32_ps(c.hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
// 8 packed bytes -> hi[i] = code[byte i >> 4] (element 2i), lo[i] = code[byte i & 15] (2i + 1).
PEFTX_AVX2_INLINE void decode16(const uint8_t* p, const Code16& c, __m256& hi, __m256& lo) {
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  hi = lookup(c, _mm256_srli_epi32(idx, 4));
  lo = lookup(c, idx);
}

// fp32 -> bf16 in the high half of each dword, bit-identical to bf16_from_float.
PEFTX_AVX2_INLINE __m256i bf16_high(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet), nan));
}
// fp32 -> f16 in the low half of each dword (high half 0), bit-identical to f16_from_float.
PEFTX_AVX2_INLINE __m256i f16_low(__m256 v) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x8000));
  const __m256i q = _mm256_or_si256(sign, _mm256_set1_epi32(0x7e00));
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(h), _mm256_castsi256_ps(q), nan));
}

// Stores the 16 values ev[i] (element 2i), od[i] (element 2i + 1) in natural order.
PEFTX_AVX2_INLINE void store_pairs(float* out, __m256 ev, __m256 od) {
  const __m256 a = _mm256_unpacklo_ps(ev, od), b = _mm256_unpackhi_ps(ev, od);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(a, b, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(a, b, 0x31));
}
PEFTX_AVX2_INLINE void store_pairs(bf16_t* out, __m256 ev, __m256 od) {
  const __m256i w = _mm256_or_si256(_mm256_srli_epi32(bf16_high(ev), 16),
                                    _mm256_and_si256(bf16_high(od), _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), w);
}
PEFTX_AVX2_INLINE void store_pairs(f16_t* out, __m256 ev, __m256 od) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_or_si256(f16_low(ev), _mm256_slli_epi32(f16_low(od), 16)));
}

PEFTX_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace avx2
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
