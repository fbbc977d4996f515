// AVX-512 versions of the CPU loops in adamw_cpu.cpp: the same operations as adamw_math.h, 16 lanes
// at a time, each separately rounded (no FMA), so their results equal the scalar code's bit for bit
// (NaN payloads aside). Every function carries the avx512 target attribute; adamw_cpu.cpp calls
// them only when the CPU has AVX-512 F/BW/VL/DQ.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

#include "optim/adamw_math.h"

// GCC 12 reports the _mm512_undefined_* placeholders inside its own intrinsics as maybe-uninitialized
// once inlined (a known false positive); the intrinsics here never read an undefined lane.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define PEFTX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline)) inline

namespace peftx {
namespace optim {
namespace avx512 {

PEFTX_AVX512 __mmask16 lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1u);
}

PEFTX_AVX512 __m512 load(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
PEFTX_AVX512 __m512 load(const bf16_t* p, __mmask16 k) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
PEFTX_AVX512 __m512 load(const f16_t* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

// Unmasked forms for the full 16-lane steps: masked stores are slow on some cores (AMD Zen 4/5).
PEFTX_AVX512 __m512 load(const float* p) { return _mm512_loadu_ps(p); }
PEFTX_AVX512 __m512 load(const bf16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
PEFTX_AVX512 __m512 load(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

PEFTX_AVX512 void store(float* p, __m512 x, __mmask16 k) { _mm512_mask_storeu_ps(p, k, x); }
PEFTX_AVX512 void store(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
// Round to nearest even; NaN stays a quiet NaN (bf16_from_float).
PEFTX_AVX512 void store(bf16_t* p, __m512 x, __mmask16 k) {
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                               _mm512_set1_epi32(0x7f800000));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet)));
}
PEFTX_AVX512 void store(bf16_t* p, __m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                               _mm512_set1_epi32(0x7f800000));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet)));
}
PEFTX_AVX512 void store(f16_t* p, __m512 x, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
PEFTX_AVX512 void store(f16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

struct Hyper {
  __m512 decay, one_minus_beta1, beta2, one_minus_beta2, eps, grad_sign, neg_step_size, bc2_sqrt;
};

PEFTX_AVX512 Hyper broadcast(const AdamWHyper& h, float neg_step_size, float bc2_sqrt) {
  return Hyper{_mm512_set1_ps(h.decay),   _mm512_set1_ps(h.one_minus_beta1), _mm512_set1_ps(h.beta2),
               _mm512_set1_ps(h.one_minus_beta2), _mm512_set1_ps(h.eps), _mm512_set1_ps(h.grad_sign),
               _mm512_set1_ps(neg_step_size),    _mm512_set1_ps(bc2_sqrt)};
}

// adamw_math for 16 lanes.
PEFTX_AVX512 __m512 math(__m512 p, __m512 g, __m512& m, __m512& v, const Hyper& h) {
  g = _mm512_mul_ps(g, h.grad_sign);
  p = _mm512_mul_ps(p, h.decay);
  m = _mm512_add_ps(m, _mm512_mul_ps(h.one_minus_beta1, _mm512_sub_ps(g, m)));
  v = _mm512_add_ps(_mm512_mul_ps(v, h.beta2), _mm512_mul_ps(_mm512_mul_ps(h.one_minus_beta2, g), g));
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), h.bc2_sqrt), h.eps);
  return _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(h.neg_step_size, m), denom));
}

template <typename T>
PEFTX_AVX512 void adamw_range(const AdamWTensor& t, int64_t b, int64_t e, const AdamWHyper& hs) {
  const Hyper h = broadcast(hs, t.neg_step_size, t.bc2_sqrt);
  T* p = static_cast<T*>(t.param);
  const T* g = static_cast<const T*>(t.grad);
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    __m512 m = load(t.exp_avg + i), v = load(t.exp_avg_sq + i);
    const __m512 np = math(load(p + i), load(g + i), m, v, h);
    store(p + i, np);
    store(t.exp_avg + i, m);
    store(t.exp_avg_sq + i, v);
  }
  if (i < e) {
    const __mmask16 k = lanes(e - i);
    __m512 m = load(t.exp_avg + i, k), v = load(t.exp_avg_sq + i, k);
    const __m512 np = math(load(p + i, k), load(g + i, k), m, v, h);
    store(p + i, np, k);
    store(t.exp_avg + i, m, k);
    store(t.exp_avg_sq + i, v, k);
  }
}

// encode_moment for 16 lanes of a block with a finite absmax.
PEFTX_AVX512 __m128i encode(const QuantTables& q, int map, __m512 x, const BlockScale& s) {
  __m512 t = s.tail ? _mm512_div_ps(x, _mm512_set1_ps(s.floor)) : _mm512_mul_ps(x, _mm512_set1_ps(s.inv));
  t = _mm512_min_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_set1_ps(-1.0f), t));
  // bucket_of: sign * 3200 + (e < 104 ? 0 : (min(e, 127) - 103) << 7 | top 7 mantissa bits).
  const __m512i u = _mm512_castps_si512(t);
  const __m512i e = _mm512_and_si512(_mm512_srli_epi32(u, 23), _mm512_set1_epi32(0xff));
  const __m512i eb = _mm512_sub_epi32(_mm512_min_epi32(e, _mm512_set1_epi32(127)), _mm512_set1_epi32(kMinExponent - 1));
  const __m512i mant = _mm512_and_si512(_mm512_srli_epi32(u, 23 - kMantissaBits),
                                        _mm512_set1_epi32((1 << kMantissaBits) - 1));
  const __mmask16 big = _mm512_cmpge_epi32_mask(e, _mm512_set1_epi32(kMinExponent));
  const __m512i b = _mm512_maskz_or_epi32(big, _mm512_slli_epi32(eb, kMantissaBits), mant);
  const __m512i key = _mm512_add_epi32(b, _mm512_mullo_epi32(_mm512_srli_epi32(u, 31), _mm512_set1_epi32(kBucketsPerSign)));
  const __m512i entry = _mm512_i32gather_epi32(key, q.entry[map], 4);
  const __m512i low = _mm512_and_si512(u, _mm512_set1_epi32(0xffff));
  const __m512i mid_low = _mm512_srli_epi32(entry, 16);
  const __mmask16 negative = _mm512_movepi32_mask(u);
  const __mmask16 has = _mm512_test_epi32_mask(entry, _mm512_set1_epi32(0x100));
  const __mmask16 above = has & ((negative & _mm512_cmplt_epu32_mask(low, mid_low)) |
                                 (~negative & _mm512_cmpgt_epu32_mask(low, mid_low)));
  const __m512i kk = _mm512_and_si512(entry, _mm512_set1_epi32(0xff));
  __m512i c = _mm512_mask_add_epi32(kk, above, kk, _mm512_set1_epi32(1));
  if (map == 1) {  // a positive second moment takes at least the smallest nonzero code
    const __mmask16 positive = _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_GT_OQ);
    c = _mm512_mask_max_epi32(c, positive, c, _mm512_set1_epi32(1));
  }
  return _mm512_cvtepi32_epi8(c);
}

// code[idx] for a 256-entry table held in 16 registers: 8 two-register permutes on the low 5 index
// bits, then blends on bits 5, 6, 7 (cheaper than a gather).
struct Table256 {
  __m512 r[16];
};

PEFTX_AVX512 Table256 load_table(const float* t) {
  Table256 out;
  for (int k = 0; k < 16; ++k) out.r[k] = _mm512_loadu_ps(t + 16 * k);
  return out;
}

PEFTX_AVX512 __m512 lookup(const Table256& t, __m512i idx) {
  __m512 s[8];
  for (int k = 0; k < 8; ++k) s[k] = _mm512_permutex2var_ps(t.r[2 * k], idx, t.r[2 * k + 1]);
  const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
  const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
  for (int k = 0; k < 4; ++k) s[k] = _mm512_mask_blend_ps(b5, s[2 * k], s[2 * k + 1]);
  for (int k = 0; k < 2; ++k) s[k] = _mm512_mask_blend_ps(b6, s[2 * k], s[2 * k + 1]);
  return _mm512_mask_blend_ps(b7, s[0], s[1]);
}

// Phase 1 for 16 lanes (k: the lanes inside the block; full: all 16, unmasked memory access).
template <bool full, typename T>
PEFTX_AVX512 void adamw8_phase1(T* p, const T* g, const uint8_t* qm, const uint8_t* qv, float* mb, float* vb,
                                __mmask16 k, __m512 am, __m512 av, const Hyper& h, const Table256& code_m,
                                const Table256& code_v, __m512i& mbits, __m512i& vbits) {
  const __m128i cm8 = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(qm)) : _mm_maskz_loadu_epi8(k, qm);
  const __m128i cv8 = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(qv)) : _mm_maskz_loadu_epi8(k, qv);
  __m512 m = _mm512_mul_ps(lookup(code_m, _mm512_cvtepu8_epi32(cm8)), am);
  __m512 v = _mm512_mul_ps(lookup(code_v, _mm512_cvtepu8_epi32(cv8)), av);
  const __m512 np = math(full ? load(p) : load(p, k), full ? load(g) : load(g, k), m, v, h);
  if (full)
    store(p, np);
  else
    store(p, np, k);
  _mm512_store_ps(mb, m);
  _mm512_store_ps(vb, v);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  mbits = _mm512_mask_max_epu32(mbits, k, mbits, _mm512_and_si512(_mm512_castps_si512(m), abs_mask));
  vbits = _mm512_mask_max_epu32(vbits, k, vbits, _mm512_and_si512(_mm512_castps_si512(v), abs_mask));
}

template <typename T>
PEFTX_AVX512 void adamw8_range(const AdamW8Tensor& t, int64_t blk0, int64_t blk1, const AdamWHyper& hs,
                               const QuantTables& q) {
  const Hyper h = broadcast(hs, t.neg_step_size, t.bc2_sqrt);
  const Table256 code_m = load_table(q.code[0]), code_v = load_table(q.code[1]);
  alignas(64) float mb[kQuantBlock], vb[kQuantBlock];
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t b = blk * kQuantBlock;
    const int64_t len = t.n - b < kQuantBlock ? t.n - b : kQuantBlock;
    T* p = static_cast<T*>(t.param) + b;
    const T* g = static_cast<const T*>(t.grad) + b;
    uint8_t* qm = t.exp_avg_q + b;
    uint8_t* qv = t.exp_avg_sq_q + b;
    const __m512 am = _mm512_set1_ps(t.exp_avg_absmax[blk]), av = _mm512_set1_ps(t.exp_avg_sq_absmax[blk]);
    __m512i mbits = _mm512_setzero_si512(), vbits = _mm512_setzero_si512();
    int64_t j = 0;
    for (; j + 16 <= len; j += 16)
      adamw8_phase1<true>(p + j, g + j, qm + j, qv + j, mb + j, vb + j, lanes(16), am, av, h, code_m, code_v, mbits,
                          vbits);
    if (j < len)
      adamw8_phase1<false>(p + j, g + j, qm + j, qv + j, mb + j, vb + j, lanes(len - j), am, av, h, code_m, code_v,
                           mbits, vbits);
    const bool tail = is_tail_block(blk, t.n);
    const BlockScale sm = block_scale(bits_float(static_cast<uint32_t>(_mm512_reduce_max_epu32(mbits))), tail);
    const BlockScale sv = block_scale(bits_float(static_cast<uint32_t>(_mm512_reduce_max_epu32(vbits))), tail);
    const __m128i zero = _mm_setzero_si128();
    for (j = 0; j < len; j += 16) {
      const __m128i cm = sm.finite ? encode(q, 0, _mm512_load_ps(mb + j), sm) : zero;
      const __m128i cv = sv.finite ? encode(q, 1, _mm512_load_ps(vb + j), sv) : zero;
      if (j + 16 <= len) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qm + j), cm);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qv + j), cv);
      } else {
        _mm_mask_storeu_epi8(qm + j, lanes(len - j), cm);
        _mm_mask_storeu_epi8(qv + j, lanes(len - j), cv);
      }
    }
    t.exp_avg_absmax[blk] = sm.stored;
    t.exp_avg_sq_absmax[blk] = sv.stored;
  }
}

}  // namespace avx512
}  // namespace optim
}  // namespace peftx

#undef PEFTX_AVX512
#pragma GCC diagnostic pop
#endif  // __x86_64__
