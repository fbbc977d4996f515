// The portable kernel table: nf4_math.h's per-element functions in plain loops. It defines the
// results the SIMD tables reproduce (bit for bit for quantize / decode / double dequantize).
#include <algorithm>
#include <type_traits>

#include "common/host_device.h"
#include "nf4/cpu/dt_dispatch.h"
#include "nf4/cpu/kernels.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace {

template <typename T>
void quantize_t(const T* w, int64_t n, int64_t blocksize, int64_t b0, int64_t b1, uint8_t* packed, float* absmax) {
  for (int64_t b = b0; b < b1; ++b) quantize_block(b, w, n, blocksize, packed, absmax);
}

void quantize_blocks(Dt dt, const void* w, int64_t n, int64_t blocksize, int64_t b0, int64_t b1, uint8_t* packed,
                     float* absmax) {
  with_dt(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_t(static_cast<const T*>(w), n, blocksize, b0, b1, packed, absmax);
  });
}

void double_quantize_blocks(const float* x, int64_t n, int64_t blocksize, const float* code, int64_t b0, int64_t b1,
                            uint8_t* q, float* absmax) {
  for (int64_t b = b0; b < b1; ++b) quantize8_block(b, x, n, blocksize, code, q, absmax);
}

template <typename T>
void decode_t(const Weight4& w, int64_t j0, int64_t j1, T* out) {
  int64_t j = j0;
  while (j < j1) {
    // One block at a time, so the scale is read once per block.
    const int64_t end = std::min(j1, (j / w.blocksize + 1) * w.blocksize);
    const float scale = w.absmax[j / w.blocksize];
    for (; j < end; ++j) {
      const uint8_t byte = w.packed[j >> 1];
      store(out++, mul_rn(w.code[(j & 1) ? (byte & 0x0f) : (byte >> 4)], scale));
    }
  }
}

void decode(const Weight4& w, int64_t j0, int64_t j1, Dt dt, void* out) {
  with_dt(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    decode_t(w, j0, j1, static_cast<T*>(out));
  });
}

void double_dequantize(const uint8_t* q, const float* nested, const float* code, int64_t blocksize, float offset,
                       int64_t i0, int64_t i1, float* out) {
  for (int64_t i = i0; i < i1; ++i) out[i] = decode_absmax(i, q, nested, code, blocksize, offset);
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy(int nv, const float* c, const float* const* v, int64_t n, float* acc) {
  for (int r = 0; r < nv; ++r)
    for (int64_t i = 0; i < n; ++i) acc[i] += c[r] * v[r][i];
}

// No gemv_rows: the products decode a row with `decode` and call `dot` (nf4_cpu.cpp).
const Kernels kTable = {"scalar", quantize_blocks, double_quantize_blocks, decode, double_dequantize, nullptr, 0, nullptr, 0, nullptr, nullptr, nullptr, nullptr, nullptr,
                        dot, axpy};

}  // namespace

const Kernels& scalar_kernels() { return kTable; }

}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
