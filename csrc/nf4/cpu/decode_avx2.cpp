// AVX2 decode of NF4 weights (dequantize and GEMM tiles), bit-identical to the scalar table: 16
// values per step from 8 packed bytes; a segment's last < 16 values and an odd start are scalar.
#include <algorithm>
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

template <typename T>
PEFTX_AVX2 void decode_t(const Weight4& w, int64_t j0, int64_t j1, T* out) {
  const Code16 code = load_code(w.code);
  int64_t j = j0;
  while (j < j1) {
    const int64_t block = j / w.blocksize;
    const int64_t end = std::min(j1, (block + 1) * w.blocksize);
    const float s = w.absmax[block];
    if ((j & 1) == 0) {
      const __m256 sv = _mm256_set1_ps(s);
      for (; j + 16 <= end; j += 16, out += 16) {
        __m256 hi, lo;
        decode16(w.packed + (j >> 1), code, hi, lo);
        store_pairs(out, _mm256_mul_ps(hi, sv), _mm256_mul_ps(lo, sv));
      }
    }
    for (; j < end; ++j) store(out++, nf4::decode(j, w.packed, w.absmax, w.code, w.blocksize));
  }
}

}  // namespace

void decode(const Weight4& w, int64_t j0, int64_t j1, Dt dt, void* out) {
  with_dt(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    decode_t(w, j0, j1, static_cast<T*>(out));
  });
}

}  // namespace avx2
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
