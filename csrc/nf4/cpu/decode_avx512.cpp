// AVX-512 decode of NF4 weights (dequantize, and the tiles of the GEMM path) and of double-quantized
// absmax. Bit-identical to the scalar table: each value is one fp32 product code * absmax, then one
// rounding to the output dtype.
#include <algorithm>
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

// Elements [j, end) of one block (j even), scale `s`: 32 per step from 16 packed bytes.
template <typename T>
PEFTX_AVX512 void decode_segment(const uint8_t* packed, __m512 code, float s, int64_t j, int64_t end, T* out) {
  const __m512 sv = _mm512_set1_ps(s);
  for (; j + 32 <= end; j += 32, out += 32) {
    __m512 hi, lo;
    decode32(load_bytes16(packed + (j >> 1)), code, hi, lo);
    store_pairs(out, _mm512_mul_ps(hi, sv), _mm512_mul_ps(lo, sv), 32);
  }
  if (j < end) {
    const int64_t count = end - j;
    __m512 hi, lo;
    decode32(load_bytes16(packed + (j >> 1), (count + 1) / 2), code, hi, lo);
    store_pairs(out, _mm512_mul_ps(hi, sv), _mm512_mul_ps(lo, sv), count);
  }
}

// bf16 output, 64 elements [j, j + 64) of one block: the block's 16 values bf16(code * absmax) as a
// vpermw table (the same rounding as store_pairs of code * absmax), the high / low nibbles looked
// up, and the even / odd results interleaved back to natural order: about half the work of the
// fp32 products and per-value rounding of decode_segment.
PEFTX_AVX512_INLINE void decode64_bf16(const uint8_t* packed, __m512 code, float s, int64_t j, bf16_t* out) {
  const __m512i table = bf16_block_table(code, s);
  const __m512i idx = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + (j >> 1))));
  const __m512i ev = _mm512_permutexvar_epi16(_mm512_srli_epi16(idx, 4), table);  // elements 0, 2, ...
  const __m512i od = _mm512_permutexvar_epi16(idx, table);                        // 1, 3, ...
  // Per 128-bit lane L: lo = elements 16L .. 16L + 7, hi = 16L + 8 .. 16L + 15.
  const __m512i lo = _mm512_unpacklo_epi16(ev, od), hi = _mm512_unpackhi_epi16(ev, od);
  const __m512i first = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi);
  const __m512i second = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), hi);
  _mm512_storeu_si512(out, first);
  _mm512_storeu_si512(out + 32, second);
}

template <typename T>
PEFTX_AVX512 void decode_t(const Weight4& w, int64_t j0, int64_t j1, T* out) {
  if (j0 >= j1) return;
  int64_t j = j0;
  if constexpr (std::is_same_v<T, bf16_t>) {
    if (w.blocksize >= 64 && j % 64 == 0) {
      // Whole 64-element runs (each inside one block), then the general loop for the rest.
      const __m512 code = _mm512_loadu_ps(w.code);
      const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
      for (; j + 64 <= j1; j += 64, out += 64) decode64_bf16(w.packed, code, w.absmax[j >> shift], j, out);
      if (j >= j1) return;
    }
  }
  if (j & 1) {  // a range that starts on a low nibble
    store(out++, nf4::decode(j, w.packed, w.absmax, w.code, w.blocksize));
    ++j;
  }
  const __m512 code = _mm512_loadu_ps(w.code);
  while (j < j1) {
    const int64_t block = j / w.blocksize;
    const int64_t end = std::min(j1, (block + 1) * w.blocksize);
    decode_segment(w.packed, code, w.absmax[block], j, end, out);
    out += end - j;
    j = end;
  }
}

}  // namespace

void decode(const Weight4& w, int64_t j0, int64_t j1, Dt dt, void* out) {
  with_dt(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    decode_t(w, j0, j1, static_cast<T*>(out));
  });
}

namespace {

// code[idx] for 16 indices in [0, 256): the 256-entry table held in 16 registers; vpermt2ps picks
// within pairs of registers by the low 5 index bits, then bits 5, 6, 7 select between the pairs
// (gathers are several times slower on some CPUs).
struct Table256 {
  __m512 t[16];
};

PEFTX_AVX512_INLINE __m512 lookup256(const Table256& tab, __m512i idx) {
  __m512 r[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm512_permutex2var_ps(tab.t[2 * k], idx, tab.t[2 * k + 1]);
  const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
  const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
  for (int k = 0; k < 4; ++k) r[k] = _mm512_mask_blend_ps(b5, r[2 * k], r[2 * k + 1]);
  for (int k = 0; k < 2; ++k) r[k] = _mm512_mask_blend_ps(b6, r[2 * k], r[2 * k + 1]);
  return _mm512_mask_blend_ps(b7, r[0], r[1]);
}

}  // namespace

// out[i] = code[q[i]] * nested[i / blocksize] + offset: a 16-lane table lookup, then a separately
// rounded multiply and add (no FMA: the scalar definition rounds twice).
PEFTX_AVX512 void double_dequantize(const uint8_t* q, const float* nested, const float* code, int64_t blocksize,
                                    float offset, int64_t i0, int64_t i1, float* out) {
  Table256 tab;
  for (int k = 0; k < 16; ++k) tab.t[k] = _mm512_loadu_ps(code + 16 * k);
  const __m512 off = _mm512_set1_ps(offset);
  int64_t i = i0;
  while (i < i1) {
    const int64_t block = i / blocksize;
    const int64_t end = std::min(i1, (block + 1) * blocksize);
    const __m512 scale = _mm512_set1_ps(nested[block]);
    for (; i < end; i += 16) {
      const int64_t count = std::min<int64_t>(16, end - i);
      const __mmask16 m = static_cast<__mmask16>((1u << count) - 1u);
      const __m512 c = lookup256(tab, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, q + i)));
      _mm512_mask_storeu_ps(out + i, m, _mm512_add_ps(_mm512_mul_ps(c, scale), off));
    }
    i = end;
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
