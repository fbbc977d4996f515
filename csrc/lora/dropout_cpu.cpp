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
    const Philox4 w = dropout_words(d.seed, e >> 3);
    for (int j = static_cast<int>(e & 7); j < kDropBlock && i < n; ++j, ++i) keep[i] = dropout_uniform(w, j) >= d.threshold;
  }
}

// OR the run's `take` bits into the packed words at bit i (the words start zeroed).
inline void put_bits(uint64_t* words, int64_t i, uint64_t bits, int64_t take) {
  if (take < 64) bits &= (1ull << take) - 1;
  const int64_t w = i >> 6, b = i & 63;
  words[w] |= bits << b;
  if (b != 0 && b + take > 64) words[w + 1] |= bits >> (64 - b);
}

// keep_bytes_scalar's mask (one Philox block per 8 elements), packed 64 elements at a time.
void keep_bits_scalar(const Dropout& d, uint64_t e0, int64_t n, uint64_t* words) {
  uint8_t keep[64];
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t c = std::min<int64_t>(64, n - i0);
    keep_bytes_scalar(d, e0 + static_cast<uint64_t>(i0), c, keep);
    uint64_t bits = 0;
    for (int64_t i = 0; i < c; ++i) bits |= static_cast<uint64_t>(keep[i]) << i;
    words[i0 >> 6] = bits;
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

// Philox over 8 V blocks (64 V elements) at once, each block's words in the low halves of 64-bit
// lanes: vpmuludq then yields a round's whole 64-bit product per lane (lo = the lane, hi = lane >> 32)
// and the high halves carry garbage that no later step reads (vpmuludq and the final compares read
// low halves only). V independent vectors of 8 blocks cover the rounds' mul -> shift -> xor latency
// chain (about 7 cycles a round): 6 vectors, unrolled over the rounds, draw 48 blocks in ~92 cycles
// on Zen 5 against ~111 for 4 vectors (whose chains leave the multipliers idle).
struct PhiloxKeys {
  uint64_t k0[10], k1[10];  // the round keys, zero-extended
};

inline PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys k;
  uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    k.k0[r] = a;
    k.k1[r] = b;
    a += 0x9E3779B9u;
    b += 0xBB67AE85u;
  }
  return k;
}

// Keep bits of elements 8q .. 8q + 64 V - 1: bits[h] bit i = element 8q + 64 h + i (V even).
template <int V>
PEFTX_AVX512 inline void keep_mask(const PhiloxKeys& k, uint32_t threshold, uint64_t q, uint64_t (&bits)[V]) {
  const __m512i qv = _mm512_set1_epi64(static_cast<long long>(q));
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i c0[V], c1[V], c2[V], c3[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    const __m512i ctr = _mm512_add_epi64(qv, _mm512_add_epi64(lane, _mm512_set1_epi64(8 * v)));  // 64-bit q + b
    c0[v] = ctr;
    c1[v] = _mm512_srli_epi64(ctr, 32);
    c2[v] = _mm512_setzero_si512();
    c3[v] = _mm512_setzero_si512();
  }
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const __m512i k0 = _mm512_set1_epi64(static_cast<long long>(k.k0[r]));
    const __m512i k1 = _mm512_set1_epi64(static_cast<long long>(k.k1[r]));
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const __m512i p0 = _mm512_mul_epu32(c0[v], m0), p2 = _mm512_mul_epu32(c2[v], m1);
      c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p2, 32), c1[v], k0, 0x96);  // hi1 ^ c1 ^ k0
      c2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3[v], k1, 0x96);  // hi0 ^ c3 ^ k1
      c1[v] = p2;                                                                      // lo1
      c3[v] = p0;                                                                      // lo0
    }
  }
  // Blocks 16h' .. 16h' + 15 into one vector of 32-bit lanes (the low halves); its 16-bit compares
  // give bit 2l + t for half t of lane l's word j, i.e. element 8l + 2j + t: spread each word's bit
  // pairs to every 8th pair, lanes 0-7 into bits[2h'] and lanes 8-15 into bits[2h' + 1].
  const __m512i low_halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i thr = _mm512_set1_epi16(static_cast<short>(threshold));
  constexpr uint64_t pairs8 = 0x0303030303030303ull;
#pragma GCC unroll 4
  for (int h = 0; h < V / 2; ++h) {
    const int a = 2 * h, b = 2 * h + 1;
    const uint32_t w0 = _mm512_cmpge_epu16_mask(_mm512_permutex2var_epi32(c0[a], low_halves, c0[b]), thr);
    const uint32_t w1 = _mm512_cmpge_epu16_mask(_mm512_permutex2var_epi32(c1[a], low_halves, c1[b]), thr);
    const uint32_t w2 = _mm512_cmpge_epu16_mask(_mm512_permutex2var_epi32(c2[a], low_halves, c2[b]), thr);
    const uint32_t w3 = _mm512_cmpge_epu16_mask(_mm512_permutex2var_epi32(c3[a], low_halves, c3[b]), thr);
    bits[a] = _pdep_u64(w0 & 0xFFFFu, pairs8) | _pdep_u64(w1 & 0xFFFFu, pairs8 << 2) |
              _pdep_u64(w2 & 0xFFFFu, pairs8 << 4) | _pdep_u64(w3 & 0xFFFFu, pairs8 << 6);
    bits[b] = _pdep_u64(w0 >> 16, pairs8) | _pdep_u64(w1 >> 16, pairs8 << 2) | _pdep_u64(w2 >> 16, pairs8 << 4) |
              _pdep_u64(w3 >> 16, pairs8 << 6);
  }
}

// Calls f(i, bits, take) over [0, n) in runs of up to 64 elements: bits (bit j = element e0 + i + j)
// holds the keep bits of the run's `take` elements. Long stretches draw 384 elements per step, the
// rest 256 or 128 at a time (no more blocks than the elements need, rounded up to 128 elements).
template <typename F>
PEFTX_AVX512 inline void for_each_keep_run(const Dropout& d, uint64_t e0, int64_t n, F&& f) {
  const PhiloxKeys k = philox_keys(d.seed);
  int64_t i = 0;
  uint64_t q = e0 >> 3;
  unsigned skip = static_cast<unsigned>(e0 & 7);  // elements of the first block before e0
  auto emit = [&](const uint64_t* bits, int runs) PEFTX_AVX512 {
    for (int h = 0; h < runs && i < n; ++h) {
      const int64_t take = std::min<int64_t>(64 - skip, n - i);
      f(i, bits[h] >> skip, take);
      i += take;
      skip = 0;
    }
  };
  while (n - i + skip >= 384) {
    uint64_t bits[6];
    keep_mask<6>(k, d.threshold, q, bits);
    emit(bits, 6);
    q += 48;
  }
  if (n - i + skip >= 256) {
    uint64_t bits[4];
    keep_mask<4>(k, d.threshold, q, bits);
    emit(bits, 4);
    q += 32;
  }
  while (i < n) {
    uint64_t bits[2];
    keep_mask<2>(k, d.threshold, q, bits);
    emit(bits, 2);
    q += 16;
  }
}

PEFTX_AVX512 void keep_bytes_avx512(const Dropout& d, uint64_t e0, int64_t n, uint8_t* keep) {
  const __m512i one = _mm512_set1_epi8(1);
  for_each_keep_run(d, e0, n, [&](int64_t i, uint64_t bits, int64_t take) PEFTX_AVX512 {
    const __mmask64 store = take == 64 ? ~0ull : ((1ull << take) - 1);
    _mm512_mask_storeu_epi8(keep + i, store, _mm512_maskz_mov_epi8(bits, one));
  });
}

PEFTX_AVX512 void keep_bits_avx512(const Dropout& d, uint64_t e0, int64_t n, uint64_t* words) {
  for_each_keep_run(d, e0, n, [&](int64_t i, uint64_t bits, int64_t take) PEFTX_AVX512 {
    put_bits(words, i, bits, take);
  });
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
  for_each_keep_run(d, e0, n, [&](int64_t i, uint64_t bits, int64_t take) PEFTX_AVX512 {
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
  });
}

}  // namespace

CpuIsa dropout_isa(CpuIsa isa) { return isa == CpuIsa::avx512 ? CpuIsa::avx512 : CpuIsa::scalar; }

void dropout_keep_bytes(CpuIsa isa, const Dropout& d, uint64_t e0, int64_t n, uint8_t* keep) {
  if (isa == CpuIsa::avx512) {
    keep_bytes_avx512(d, e0, n, keep);
  } else {
    keep_bytes_scalar(d, e0, n, keep);
  }
}

void dropout_keep_bits(CpuIsa isa, const Dropout& d, uint64_t e0, int64_t row_stride, int64_t rows, int64_t n,
                       uint64_t* words) {
  const int64_t per_row = (n + 63) / 64;
  std::fill(words, words + rows * per_row, uint64_t{0});
  const bool avx512 = isa == CpuIsa::avx512;
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t e = e0 + static_cast<uint64_t>(r * row_stride);
    if (avx512) {
      keep_bits_avx512(d, e, n, words + r * per_row);
    } else {
      keep_bits_scalar(d, e, n, words + r * per_row);
    }
  }
}

void dropout_rows(CpuIsa isa, const Dropout& d, uint64_t e0, int64_t n, DropDt dt, const void* x, void* xd,
                  const void* t, void* dx) {
  if (isa == CpuIsa::avx512) {
    dropout_rows_avx512(d, e0, n, dt, x, xd, t, dx);
  } else {
    dropout_rows_scalar(d, e0, n, dt, x, xd, t, dx);
  }
}

}  // namespace lora
}  // namespace peftx
