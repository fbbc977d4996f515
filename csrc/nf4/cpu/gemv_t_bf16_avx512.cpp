// AVX-512 BF16 transposed product for few tokens (the input gradient dx = g W of a 4-bit layer with
// bf16 activations): vdpbf16ps over pairs of W's rows (pair_dot_avx512.h), the strips decoded into
// the pair buffer as the values bf16(code * absmax) nf4_dequantize gives.
// Lane order: the pair vectors come from vpunpck{l,h}wd of the decoded rows (even features from the
// high nibbles, odd from the low), so an accumulator's lanes are a fixed permutation of its 16
// features (lane_feature below), undone once when the chunk is written out.
// Requires blocksize >= 64 and cols % 128 == 0 (a 64-feature half never crosses a block).
#include <algorithm>
#include <vector>

#include "nf4/cpu/avx512.h"
#include "nf4/cpu/pair_dot_avx512.h"
#include "nf4/cpu/simd_avx512.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {
namespace {

// Feature (within the chunk) of lane l of pair vector v = 4 h + kind: h the 64-feature half; kind
// 0 / 1: low / high unpack of the even features, 2 / 3: of the odd ones.
constexpr int lane_feature(int v, int l) {
  const int h = v / 4, kind = v % 4, lane128 = l / 4, j = l % 4;
  const int word = 8 * lane128 + (kind % 2 == 0 ? j : 4 + j);
  return 64 * h + 2 * word + (kind >= 2 ? 1 : 0);
}

// Row n's features [k, k + 128) as dequantized bf16: hi[h] = even features of half h, lo[h] = odd.
PEFTX_AVX512BF16_INLINE void decode_row(const Weight4& w, int shift, __m512 code, int64_t n, int64_t k, __m512i (&hi)[2],
                                    __m512i (&lo)[2]) {
  const int64_t j = n * w.cols + k;
  for (int h = 0; h < 2; ++h) {
    const __m512i table = bf16_block_table_cvt(code, w.absmax[(j + 64 * h) >> shift]);
    const __m512i idx =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.packed + (j >> 1) + 32 * h)));
    hi[h] = _mm512_permutexvar_epi16(_mm512_srli_epi16(idx, 4), table);
    lo[h] = _mm512_permutexvar_epi16(idx, table);
  }
}

}  // namespace

PEFTX_AVX512BF16 void gemv_t_bf16(const Weight4& w, const uint16_t* g, int64_t ldg, int64_t tokens, int64_t c0,
                                  int64_t c1, float* out) {
  const int64_t N = w.rows;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const __m512 code = _mm512_loadu_ps(w.code);
  std::vector<float> acc(static_cast<size_t>(tokens * kPairChunk));
  int feature[kPairChunk];
  for (int v = 0; v < 8; ++v)
    for (int l = 0; l < 16; ++l) feature[16 * v + l] = lane_feature(v, l);
  for (int64_t k = c0; k < c1; k += kPairChunk) {
    pair_dot_chunk(N, w.cols, g, ldg, tokens, k, feature, acc.data(), out,
                   [&](int64_t n0, int64_t npairs, __m512i* pairs) PEFTX_AVX512BF16 {
      for (int64_t q = 0; q < npairs; ++q) {
        const int64_t n = n0 + 2 * q;
        // The rows' bytes of this chunk are one line each, K / 2 apart: a stride the hardware
        // prefetchers do not follow across pages. Fetch the next chunk's line of both rows into
        // L2 now (all rows of a chunk, 64 bytes each, fit there until the next chunk reads them).
        if (n + kPairStripRows + 1 < N) {  // and this chunk's lines one strip ahead (the first chunk has no other)
          _mm_prefetch(reinterpret_cast<const char*>(w.packed + (((n + kPairStripRows) * w.cols + k) >> 1)), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(w.packed + (((n + kPairStripRows + 1) * w.cols + k) >> 1)),
                       _MM_HINT_T0);
        }
        if (k + kPairChunk < c1) {
          _mm_prefetch(reinterpret_cast<const char*>(w.packed + ((n * w.cols + k + kPairChunk) >> 1)), _MM_HINT_T1);
          if (n + 1 < N)
            _mm_prefetch(reinterpret_cast<const char*>(w.packed + (((n + 1) * w.cols + k + kPairChunk) >> 1)),
                         _MM_HINT_T1);
        }
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
    });
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
