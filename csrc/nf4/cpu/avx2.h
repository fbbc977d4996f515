// The AVX2 kernel table's functions (defined in *_avx2.cpp; table in isa.cpp).
#pragma once

#include "nf4/cpu/kernels.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx2 {

void quantize_blocks(Dt dt, const void* w, int64_t n, int64_t blocksize, int64_t b0, int64_t b1, uint8_t* packed,
                     float* absmax);
void decode(const Weight4& w, int64_t j0, int64_t j1, Dt dt, void* out);
// fp32 activations, chunk 16.
void gemv_rows_f32(const Weight4& w, const GemvX& x, int64_t o0, int64_t o1, const float* bias, Dt out_dt, void* y,
                   int64_t ldy);
float dot(const float* a, const float* b, int64_t n);
void axpy(int nv, const float* c, const float* const* v, int64_t n, float* acc);

}  // namespace avx2
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
