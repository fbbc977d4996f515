// AVX-512 BF16 transposed product for few tokens (the input gradient dx = g W of a 4-bit layer with
// bf16 activations): vdpbf16ps over pairs of W's rows. For a chunk of 128 features, W is decoded a
// strip of 32 rows at a time into a 16 KiB L1 buffer holding, per pair of rows (n, n + 1), eight
// vectors of (W[n, f], W[n + 1, f]) bf16 pairs, the values bf16(code * absmax) nf4_dequantize gives;
// then each tile of 3 tokens runs through the strip with 24 accumulators, the pair
// (g[m, n], g[m, n + 1]) broadcast as one dword. Each buffer load feeds 3 dot products (512-bit L1
// loads, not vdpbf16ps, bound these loops on the machines we measure).
// Lane order: the pair vectors come from vpunpck{l,h}wd of the decoded rows (even features from the
// high nibbles, odd from the low), so an accumulator's lanes are a fixed permutation of its 16
// features (lane_feature below), undone once when the chunk is written out.
// Requires blocksize >= 64 and cols % 128 == 0 (a 64-feature half never crosses a block).
#include <algorithm>
#include <vector>

#include "nf4/cpu/avx512.h"
#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {
namespace {

constexpr int64_t kChunk = 128;     // features per chunk (one 64-byte run of a row)
constexpr int64_t kStripRows = 32;  // rows decoded per strip: 16 pairs x 8 vectors x 64 bytes
constexpr int kTileTokens = 3;      // tokens per pass over a strip: 3 x 8 accumulators

// Feature (within the chunk) of lane l of pair vector v = 4 h + kind: h the 64-feature half; kind
// 0 / 1: low / high unpack of the even features, 2 / 3: of the odd ones.
constexpr int lane_feature(int v, int l) {
  const int h = v / 4, kind = v % 4, lane128 = l / 4, j = l % 4;
  const int word = 8 * lane128 + (kind % 2 == 0 ? j : 4 + j);
  return 64 * h + 2 * word + (kind >= 2 ? 1 : 0);
}

PEFTX_AVX512_INLINE __m512i block_table(__m512 code, float absmax) {
  const __m512i words = _mm512_srli_epi32(bf16_high(_mm512_mul_ps(code, _mm512_set1_ps(absmax))), 16);
  return _mm512_broadcast_i64x4(_mm512_cvtepi32_epi16(words));
}

// Row n's features [k, k + 128) as dequantized bf16: hi[h] = even features of half h, lo[h] = odd.
PEFTX_AVX512_INLINE void decode_row(const Weight4& w, int shift, __m512 code, int64_t n, int64_t k, __m512i (&hi)[2],
                                    __m512i (&lo)[2]) {
  const int64_t j = n * w.cols + k;
  for (int h = 0; h < 2; ++h) {
    const __m512i table = block_table(code, w.absmax[(j + 64 * h) >> shift]);
    const __m512i idx =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.packed + (j >> 1) + 32 * h)));
    hi[h] = _mm512_permutexvar_epi16(_mm512_srli_epi16(idx, 4), table);
    lo[h] = _mm512_permutexvar_epi16(idx, table);
  }
}

template <int TT>
PEFTX_AVX512BF16 void tile(const __m512i* pairs, int64_t npairs, const uint16_t* g, int64_t ldg, int64_t n0,
                           float* acc_mem) {
  __m512 acc[TT][8];
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < 8; ++v) acc[t][v] = _mm512_loadu_ps(acc_mem + t * kChunk + 16 * v);
  for (int64_t q = 0; q < npairs; ++q) {
    __m512bh gp[TT];
    for (int t = 0; t < TT; ++t) {
      uint32_t pair;
      __builtin_memcpy(&pair, g + t * ldg + n0 + 2 * q, sizeof(pair));
      gp[t] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
    }
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {
      const __m512bh wv = (__m512bh)_mm512_load_si512(pairs + q * 8 + v);
      for (int t = 0; t < TT; ++t) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], wv, gp[t]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < 8; ++v) _mm512_storeu_ps(acc_mem + t * kChunk + 16 * v, acc[t][v]);
}

}  // namespace

PEFTX_AVX512BF16 void gemv_t_bf16(const Weight4& w, const uint16_t* g, int64_t ldg, int64_t tokens, int64_t c0,
                                  int64_t c1, float* out) {
  const int64_t N = w.rows, K = w.cols;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const __m512 code = _mm512_loadu_ps(w.code);
  alignas(64) __m512i pairs[kStripRows / 2 * 8];
  std::vector<float> acc(static_cast<size_t>(tokens * kChunk));
  int feature[kChunk];
  for (int v = 0; v < 8; ++v)
    for (int l = 0; l < 16; ++l) feature[16 * v + l] = lane_feature(v, l);
  for (int64_t k = c0; k < c1; k += kChunk) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t n0 = 0; n0 < N; n0 += kStripRows) {
      const int64_t rows = std::min(kStripRows, N - n0), npairs = (rows + 1) / 2;
      for (int64_t q = 0; q < npairs; ++q) {
        const int64_t n = n0 + 2 * q;
        __m512i hi0[2], lo0[2], hi1[2], lo1[2];
        decode_row(w, shift, code, n, k, hi0, lo0);
        if (n + 1 < N) {
          decode_row(w, shift, code, n + 1, k, hi1, lo1);
        } else {
          hi1[0] = hi1[1] = lo1[0] = lo1[1] = _mm512_setzero_si512();  // g's pad column is 0 too
        }
        __m512i* dst = pairs + q * 8;
        for (int h = 0; h < 2; ++h) {
          dst[4 * h + 0] = _mm512_unpacklo_epi16(hi0[h], hi1[h]);
          dst[4 * h + 1] = _mm512_unpackhi_epi16(hi0[h], hi1[h]);
          dst[4 * h + 2] = _mm512_unpacklo_epi16(lo0[h], lo1[h]);
          dst[4 * h + 3] = _mm512_unpackhi_epi16(lo0[h], lo1[h]);
        }
      }
      for (int64_t m0 = 0; m0 < tokens; m0 += kTileTokens) {
        const uint16_t* gm = g + m0 * ldg;
        float* am = acc.data() + m0 * kChunk;
        switch (std::min<int64_t>(kTileTokens, tokens - m0)) {
          case 1: tile<1>(pairs, npairs, gm, ldg, n0, am); break;
          case 2: tile<2>(pairs, npairs, gm, ldg, n0, am); break;
          default: tile<3>(pairs, npairs, gm, ldg, n0, am); break;
        }
      }
    }
    for (int64_t m = 0; m < tokens; ++m)
      for (int i = 0; i < kChunk; ++i) out[m * K + k + feature[i]] = acc[m * kChunk + i];
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
