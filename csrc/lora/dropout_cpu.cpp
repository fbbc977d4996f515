#include "lora/dropout_cpu.h"

#include <immintrin.h>

#include <algorithm>

#include "common/cpu_isa.h"
#include "common/host_device.h"

// GCC 12 reports its own _mm512_set1_epi32 (built on _mm512_undefined_epi32) as "maybe
// uninitialized" once inlined here; the intrinsic fully defines its result.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace peftx {
namespace lora {
namespace {

void keep_bytes_scalar(const Dropout& d, uint64_t e0, int64_t n, uint8_t* keep) {
  int64_t i = 0;
  while (i < n) {
    const uint64_t e = e0 + static_cast<uint64_t>(i);
    const Philox4 w = dropout_words(d.seed, e >> 2);
    for (unsigned j = static_cast<unsigned>(e & 3); j < 4 && i < n; ++j, ++i) keep[i] = w.v[j] >= d.threshold;
  }
}

template <typename T>
void rows_scalar(const Dropout& d, uint64_t e0, int64_t n, const T* x, T* xd, const T* t, T* dx) {
  uint8_t keep[256];
  for (int64_t i0 = 0; i0 < n; i0 += 256) {
    const int64_t c = std::min<int64_t>(256, n - i0);
    keep_bytes_scalar(d, e0 + static_cast<uint64_t>(i0), c, keep);
    for (int64_t i = 0; i < c; ++i) {
      store(xd + i0 + i, keep[i] ? mul_rn(to_float(x[i0 + i]), d.scale) : 0.0f);
      if (dx != nullptr && keep[i])
        store(dx + i0 + i, add_rn(to_float(dx[i0 + i]), mul_rn(to_float(t[i0 + i]), d.scale)));
    }
  }
}

void dropout_rows_scalar(const Dropout& d, uint64_t e0, int64_t n, DropDt dt, const void* x, void* xd,
                         const void* t, void* dx) {
  switch (dt) {
    case DropDt::kF32:
      return rows_scalar(d, e0, n, static_cast<const float*>(x), static_cast<float*>(xd),
                         static_cast<const float*>(t), static_cast<float*>(dx));
    case DropDt::kBF16:
      return rows_scalar(d, e0, n, static_cast<const bf16_t*>(x), static_cast<bf16_t*>(xd),
                         static_cast<const bf16_t*>(t), static_cast<bf16_t*>(dx));
    case DropDt::kF16:
      return rows_scalar(d, e0, n, static_cast<const f16_t*>(x), static_cast<f16_t*>(xd),
                         static_cast<const f16_t*>(t), static_cast<f16_t*>(dx));
  }
}

#define PEFTX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,bmi2")))

// (hi, lo) of the 32x32-bit products a * m in each of the 16 lanes.
PEFTX_AVX512 inline void mulhilo16(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                         // lanes 0, 2, ...: 64-bit
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1, 3, ...
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// Keep bits of elements 4q .. 4q + 63 (bit i = element 4q + i): 16 Philox blocks, one per lane.
PEFTX_AVX512 inline uint64_t keep_mask64(const Dropout& d, uint64_t q) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i qlo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q)));
  __m512i c0 = _mm512_add_epi32(qlo, lane);
  // Carry into the high word where q's low word wraps inside these 16 counters.
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, qlo);
  __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q >> 32))), carry,
                                     _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q >> 32))),
                                     _mm512_set1_epi32(1));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(c0, m0, &hi0, &lo0);
    mulhilo16(c2, m1, &hi1, &lo1);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(d.threshold));
  // Word j of lane l is element 4l + j: spread each word's 16 keep bits to every 4th bit.
  const uint64_t w0 = _mm512_cmpge_epu32_mask(c0, thr), w1 = _mm512_cmpge_epu32_mask(c1, thr),
                 w2 = _mm512_cmpge_epu32_mask(c2, thr), w3 = _mm512_cmpge_epu32_mask(c3, thr);
  constexpr uint64_t every4 = 0x1111111111111111ull;
  return _pdep_u64(w0, every4) | _pdep_u64(w1, every4 << 1) | _pdep_u64(w2, every4 << 2) |
         _pdep_u64(w3, every4 << 3);
}

PEFTX_AVX512 void keep_bytes_avx512(const Dropout& d, uint64_t e0, int64_t n, uint8_t* keep) {
  const __m512i one = _mm512_set1_epi8(1);
  int64_t i = 0;
  uint64_t q = e0 >> 2;
  unsigned skip = static_cast<unsigned>(e0 & 3);  // elements of the first block before e0
  while (i < n) {
    const uint64_t bits = keep_mask64(d, q) >> skip;
    const int64_t take = std::min<int64_t>(64 - skip, n - i);
    const __mmask64 store = take == 64 ? ~0ull : ((1ull << take) - 1);
    _mm512_mask_storeu_epi8(keep + i, store, _mm512_maskz_mov_epi8(bits, one));
    i += take;
    q += 16;
    skip = 0;
  }
}


// 16 elements of dt at p + i (lanes outside m read as 0) as fp32: exact.
PEFTX_AVX512 inline __m512 load16(DropDt dt, const void* p, int64_t i, __mmask16 m) {
  switch (dt) {
    case DropDt::kF32:
      return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
    case DropDt::kBF16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i)), 16));
    case DropDt::kF16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
  }
  return _mm512_setzero_ps();
}

// Stores the lanes of v selected by m at p + i, rounded to dt exactly as host_device.h's
// bf16_from_float / f16_from_float (nearest even; NaN as those functions spell it).
PEFTX_AVX512 inline void store16(DropDt dt, void* p, int64_t i, __mmask16 m, __m512 v) {
  if (dt == DropDt::kF32) return _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  __m256i h;
  if (dt == DropDt::kBF16) {
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    h = _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40))));
  } else {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i qnan = _mm512_or_si512(_mm512_and_si512(hi, _mm512_set1_epi32(0x8000)), _mm512_set1_epi32(0x7e00));
    h = _mm256_mask_mov_epi16(h, nan, _mm512_cvtepi32_epi16(qnan));
  }
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, h);
}

PEFTX_AVX512 void dropout_rows_avx512(const Dropout& d, uint64_t e0, int64_t n, DropDt dt, const void* x, void* xd,
                                      const void* t, void* dx) {
  const __m512 scale = _mm512_set1_ps(d.scale);
  int64_t i = 0;
  uint64_t q = e0 >> 2;
  unsigned skip = static_cast<unsigned>(e0 & 3);
  while (i < n) {
    const uint64_t bits = keep_mask64(d, q) >> skip;
    const int64_t take = std::min<int64_t>(64 - skip, n - i);
    for (int64_t j = 0; j < take; j += 16) {
      const int64_t c = std::min<int64_t>(16, take - j);
      const __mmask16 in = static_cast<__mmask16>(c == 16 ? 0xFFFFu : ((1u << c) - 1u));
      const __mmask16 keep = static_cast<__mmask16>(bits >> j) & in;
      store16(dt, xd, i + j, in, _mm512_maskz_mul_ps(keep, load16(dt, x, i + j, in), scale));
      if (dx != nullptr) {
        const __m512 sum = _mm512_add_ps(load16(dt, dx, i + j, keep), _mm512_mul_ps(load16(dt, t, i + j, keep), scale));
        store16(dt, dx, i + j, keep, sum);
      }
    }
    i += take;
    q += 16;
    skip = 0;
  }
}

}  // namespace

const char* dropout_isa() { return cpu_isa() == CpuIsa::avx512 ? "avx512" : "scalar"; }

void dropout_keep_bytes(const Dropout& d, uint64_t e0, int64_t n, uint8_t* keep) {
  if (cpu_isa() == CpuIsa::avx512) {
    keep_bytes_avx512(d, e0, n, keep);
  } else {
    keep_bytes_scalar(d, e0, n, keep);
  }
}

void dropout_rows(const Dropout& d, uint64_t e0, int64_t n, DropDt dt, const void* x, void* xd, const void* t,
                  void* dx) {
  if (cpu_isa() == CpuIsa::avx512) {
    dropout_rows_avx512(d, e0, n, dt, x, xd, t, dx);
  } else {
    dropout_rows_scalar(d, e0, n, dt, x, xd, t, dx);
  }
}

}  // namespace lora
}  // namespace peftx
