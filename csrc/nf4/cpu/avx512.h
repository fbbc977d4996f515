// The AVX-512 kernel table's functions (defined in *_avx512.cpp; table in isa.cpp).
#pragma once

#include "nf4/cpu/kernels.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace avx512 {

void quantize_blocks(Dt dt, const void* w, int64_t n, int64_t blocksize, int64_t b0, int64_t b1, uint8_t* packed,
                     float* absmax);
void double_quantize_blocks(const float* x, int64_t n, int64_t blocksize, const float* code, int64_t b0, int64_t b1,
                            uint8_t* q, float* absmax);
void decode(const Weight4& w, int64_t j0, int64_t j1, Dt dt, void* out);
void double_dequantize(const uint8_t* q, const float* nested, const float* code, int64_t blocksize, float offset,
                       int64_t i0, int64_t i1, float* out);
// fp32 activations (chunk 32) and, on CPUs with avx512_bf16, bf16 activations (chunk 64).
void gemv_rows_f32(const Weight4& w, const GemvX& x, int64_t o0, int64_t o1, const float* bias, Dt out_dt, void* y,
                   int64_t ldy);
void gemv_rows_bf16(const Weight4& w, const GemvX& x, int64_t o0, int64_t o1, const float* bias, Dt out_dt, void* y,
                    int64_t ldy);
void gemv_t_rows(const Weight4& w, const float* g, int64_t ldg, int64_t tokens, int64_t o0, int64_t o1, float* acc);
void gemv_t_bf16(const Weight4& w, const uint16_t* g, int64_t ldg, int64_t tokens, int64_t c0, int64_t c1, float* out);
void gemv_t_cols(const Weight4& w, const float* g, int64_t ldg, int64_t tokens, int64_t c0, int64_t c1, Dt out_dt,
                 void* out, int64_t ldo);
void perm_x_f32(const void* x, Dt dt, int64_t ldx, int64_t t0, int64_t t1, int64_t cols, float* out);
void gemm_rows_f32(const Weight4& w, const float* xp, int64_t tokens, int64_t o0, int64_t o1, const float* bias,
                   Dt out_dt, void* y, int64_t ldy);
float dot(const float* a, const float* b, int64_t n);
void axpy(int nv, const float* c, const float* const* v, int64_t n, float* acc);

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
