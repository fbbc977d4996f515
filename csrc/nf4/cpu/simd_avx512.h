// AVX-512 building blocks of the NF4 CPU kernels (AVX-512 F/BW/VL/DQ). Every function that uses
// these intrinsics carries PEFTX_AVX512 (or PEFTX_AVX512BF16): the files are compiled for the
// baseline ISA, so nothing here runs unless isa.cpp found the CPU features.
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

#define PEFTX_AVX512 __attribute__((target("avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq")))
#define PEFTX_AVX512BF16 \
  __attribute__((target("avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define PEFTX_AVX512_INLINE PEFTX_AVX512 static inline __attribute__((always_inline))
#define PEFTX_AVX512BF16_INLINE PEFTX_AVX512BF16 static inline __attribute__((always_inline))

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {

// --- loads: 16 elements of float / bf16 / f16 as fp32, exact --------------------------------
PEFTX_AVX512_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
PEFTX_AVX512_INLINE __m512 load16(const bf16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
PEFTX_AVX512_INLINE __m512 load16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// The first `count` (<= 16) elements; the others read as 0.
PEFTX_AVX512_INLINE __m512 load16(const float* p, int64_t count) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), p);
}
PEFTX_AVX512_INLINE __m512 load16(const bf16_t* p, int64_t count) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1u), p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
PEFTX_AVX512_INLINE __m512 load16(const f16_t* p, int64_t count) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1u), p));
}

// --- NF4 nibbles -> code values ------------------------------------------------------------
// 16 packed bytes (the first `bytes` of them, the rest read as 0) -> the 32 weights they hold:
// hi[i] = code[byte i >> 4] (element 2i), lo[i] = code[byte i & 15] (element 2i + 1).
// vpermps reads only the low 4 bits of each index, so the low nibble needs no mask.
PEFTX_AVX512_INLINE void decode32(__m128i bytes16, __m512 code, __m512& hi, __m512& lo) {
  const __m512i idx = _mm512_cvtepu8_epi32(bytes16);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), code);
  lo = _mm512_permutexvar_ps(idx, code);
}
PEFTX_AVX512_INLINE __m128i load_bytes16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
PEFTX_AVX512_INLINE __m128i load_bytes16(const uint8_t* p, int64_t bytes) {
  return _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << bytes) - 1u), p);
}

// --- 128-feature chunks decoded by nibble position (the fp32 register-tile kernels) ---------------
// A row's 64 bytes of a chunk as 16 dwords: nibble s of dword d (the vector shifted right by 4 s,
// as a vpermps index) is element chunk_lane_element(s, d) = 8 d + (s ^ 1) of the chunk (a byte's
// high nibble is its even element), so lane d always holds 8 consecutive elements.
constexpr int64_t kLaneChunk = 128;
constexpr int chunk_lane_element(int s, int d) { return 8 * d + (s ^ 1); }
// Their absmax for a chunk at element offset j (a multiple of 128; blocksize >= 32):
// absmax[(j + 8 d) >> shift] in lane d, from broadcasts and blends (no permute: the decode's vpermps
// already fill the shuffle port).
PEFTX_AVX512_INLINE __m512 chunk_lane_scales(const float* absmax, int64_t j, int shift) {
  const float* a = absmax + (j >> shift);
  if (shift >= 7) return _mm512_set1_ps(a[0]);
  if (shift == 6) return _mm512_mask_mov_ps(_mm512_set1_ps(a[0]), 0xff00, _mm512_set1_ps(a[1]));
  __m512 v = _mm512_mask_mov_ps(_mm512_set1_ps(a[0]), 0x00f0, _mm512_set1_ps(a[1]));
  v = _mm512_mask_mov_ps(v, 0x0f00, _mm512_set1_ps(a[2]));
  return _mm512_mask_mov_ps(v, 0xf000, _mm512_set1_ps(a[3]));  // shift == 5: blocksize 32
}

// --- fp32 -> 16-bit, bit-identical to host_device.h's bf16_from_float / f16_from_float ----------
// Rounded bf16 of each lane in its high 16 bits (low bits undefined).
PEFTX_AVX512_INLINE __m512i bf16_high(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  // NaN stays NaN (quiet), as bf16_from_float: (u >> 16) | 0x40 in the high half.
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
}
// f16 of each lane in the low 16 bits of a dword (high bits 0).
PEFTX_AVX512_INLINE __m512i f16_low(__m512 v) {
  __m512i h = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // NaN -> sign | 0x7e00, as f16_from_float (the instruction would keep payload bits).
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000));
  return _mm512_mask_or_epi32(h, nan, sign, _mm512_set1_epi32(0x7e00));
}

// The 16 values of one block, bf16(code[i] * absmax) (nf4_math.h's decode rounded as
// bf16_from_float: exactly what nf4_dequantize gives in bf16), as a 32-word vpermw table (the 16
// repeated, so an index's bit 4 is ignored: a packed byte's low nibble needs no mask).
PEFTX_AVX512_INLINE __m512i bf16_block_table(__m512 code, float absmax) {
  // The rounded values sit in the high words of the 16 dwords: one vpermw gathers words 1, 3, ..., 31
  // into both halves.
  const __m512i high_words = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 31, 29,
                                              27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_permutexvar_epi16(high_words, bf16_high(_mm512_mul_ps(code, _mm512_set1_ps(absmax))));
}

// bf16_block_table in one vcvtne2ps2bf16 (AVX512_BF16), for the vdpbf16ps product kernels: the
// instruction rounds as bf16_from_float (to nearest even, NaN quieted the same way) except that it
// flushes fp32 denormal products to zero, which vdpbf16ps would read as zero anyway (it treats
// denormal inputs as zero).
PEFTX_AVX512BF16_INLINE __m512i bf16_block_table_cvt(__m512 code, float absmax) {
  const __m512 v = _mm512_mul_ps(code, _mm512_set1_ps(absmax));
  return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

// Stores 32 values given as even lanes `ev` (elements 0, 2, ..., 30) and odd lanes `od` in natural
// order; only the first `count` (<= 32) when masked.
PEFTX_AVX512_INLINE void store_pairs(float* out, __m512 ev, __m512 od, int64_t count) {
  const __m512i ia = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i ib = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512 a = _mm512_permutex2var_ps(ev, ia, od), b = _mm512_permutex2var_ps(ev, ib, od);
  if (count >= 32) {
    _mm512_storeu_ps(out, a);
    _mm512_storeu_ps(out + 16, b);
  } else {
    const uint32_t m = static_cast<uint32_t>((uint64_t(1) << count) - 1u);
    _mm512_mask_storeu_ps(out, static_cast<__mmask16>(m), a);
    _mm512_mask_storeu_ps(out + 16, static_cast<__mmask16>(m >> 16), b);
  }
}
PEFTX_AVX512_INLINE void store_words(void* out, __m512i words, int64_t count) {
  if (count >= 32) {
    _mm512_storeu_si512(out, words);
  } else {
    _mm512_mask_storeu_epi16(out, static_cast<__mmask32>((uint64_t(1) << count) - 1u), words);
  }
}
PEFTX_AVX512_INLINE void store_pairs(bf16_t* out, __m512 ev, __m512 od, int64_t count) {
  const __m512i lo_word = _mm512_srli_epi32(bf16_high(ev), 16);
  const __m512i hi_word = _mm512_and_si512(bf16_high(od), _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  store_words(out, _mm512_or_si512(lo_word, hi_word), count);
}
PEFTX_AVX512_INLINE void store_pairs(f16_t* out, __m512 ev, __m512 od, int64_t count) {
  store_words(out, _mm512_or_si512(f16_low(ev), _mm512_slli_epi32(f16_low(od), 16)), count);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
