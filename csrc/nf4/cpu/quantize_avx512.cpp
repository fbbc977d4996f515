// AVX-512 NF4 quantization, byte-equal to nf4_math.h's quantize_block (bitsandbytes 0.50): for each
// full block, absmax = max |w| (an integer max over the sign-cleared bit patterns: exact, and a NaN
// input wins over every finite value and inf, so NaN reaches absmax and the caller's check); the
// values are scaled by w * (1 / max(absmax, 1e-38)), clamped to [-1, 1], and encoded as the number
// of midpoints strictly below them (a 4-step branch-free binary search). The one partial tail block
// (x / absmax in bitsandbytes) runs the scalar quantize_block.
#include <type_traits>

#include "nf4/cpu/avx512.h"
#include "nf4/cpu/dt_dispatch.h"
#include "nf4/cpu/simd_avx512.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {
namespace {

// The NF4 index of each scaled lane: the largest c in [0, 15] with s > midpoint[c - 1].
PEFTX_AVX512_INLINE __m512i encode16(__m512 s, __m512 mid_shifted) {
  // mid_shifted[c] = midpoint[c - 1] for c in [1, 15]; lane 0 is never read.
  __m512i q = _mm512_setzero_si512();
  for (int step = 8; step >= 1; step >>= 1) {
    const __m512i c = _mm512_add_epi32(q, _mm512_set1_epi32(step));
    const __mmask16 gt = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(c, mid_shifted), _CMP_GT_OQ);
    q = _mm512_mask_mov_epi32(q, gt, c);
  }
  return q;
}

// 16 indices (elements 2i, 2i + 1 in dword lanes 2i, 2i + 1) -> 8 bytes (2i << 4 | 2i + 1).
PEFTX_AVX512_INLINE __m128i pack8(__m512i q) {
  const __m512i b = _mm512_or_si512(_mm512_slli_epi64(q, 4), _mm512_srli_epi64(q, 32));
  return _mm512_cvtepi64_epi8(b);
}

PEFTX_AVX512_INLINE __m512 clamp_scale(__m512 v, __m512 inv) {
  const __m512 s = _mm512_mul_ps(v, inv);
  return _mm512_min_ps(_mm512_max_ps(s, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f));
}

template <typename T>
PEFTX_AVX512 void quantize_full_block(const T* src, int64_t blocksize, __m512 mid_shifted, uint8_t* packed,
                                      float* absmax) {
  __m512i m = _mm512_setzero_si512();
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  for (int64_t i = 0; i < blocksize; i += 16)
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(load16(src + i)), magnitude));
  const float amax = bits_float(_mm512_reduce_max_epu32(m));
  *absmax = amax;
  const float floored = amax > kAbsmaxFloor ? amax : kAbsmaxFloor;
  const __m512 inv = _mm512_set1_ps(div_rn(1.0f, floored));
  for (int64_t i = 0; i < blocksize; i += 32) {
    const __m512i q0 = encode16(clamp_scale(load16(src + i), inv), mid_shifted);
    const __m512i q1 = encode16(clamp_scale(load16(src + i + 16), inv), mid_shifted);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), _mm_unpacklo_epi64(pack8(q0), pack8(q1)));
  }
}

template <typename T>
PEFTX_AVX512 void quantize_t(const T* w, int64_t n, int64_t blocksize, int64_t b0, int64_t b1, uint8_t* packed,
                             float* absmax) {
  alignas(64) float shifted[16] = {0.0f};
  for (int c = 1; c < 16; ++c) shifted[c] = kMidpoints[c - 1];
  const __m512 mid_shifted = _mm512_load_ps(shifted);
  for (int64_t b = b0; b < b1; ++b) {
    if ((b + 1) * blocksize <= n) {
      quantize_full_block(w + b * blocksize, blocksize, mid_shifted, packed + b * blocksize / 2, absmax + b);
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

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
