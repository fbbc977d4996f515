// Launchers of the NF4 CUDA kernels: raw pointers and a stream in, no torch types, so nf4_cuda.cu
// compiles without ATen headers. Shapes are in the comments; every pointer is device memory and
// contiguous. Each returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/float_kind.h"

namespace peftx {
namespace nf4 {

using peftx::FloatKind;

// w [n] (kind) -> packed [ceil(n/2)] uint8, absmax [ceil(n/blocksize)] fp32.
cudaError_t launch_nf4_quantize(FloatKind kind, const void* w, int64_t n, int64_t blocksize,
                                uint8_t* packed, float* absmax, cudaStream_t stream);
// packed, absmax fp32, code [16] -> out [n] (kind).
cudaError_t launch_nf4_dequantize(FloatKind kind, const uint8_t* packed, const float* absmax,
                                  const float* code, int64_t blocksize, int64_t n, void* out,
                                  cudaStream_t stream);
// x [n] fp32, code [256] sorted -> q [n] uint8, absmax [ceil(n/blocksize)] fp32.
cudaError_t launch_nf4_double_quantize(const float* x, int64_t n, int64_t blocksize,
                                       const float* code, uint8_t* q, float* absmax,
                                       cudaStream_t stream);
// q [n] uint8, nested_absmax [ceil(n/blocksize)], code [256], offset [1] -> out [n] fp32.
cudaError_t launch_nf4_double_dequantize(const uint8_t* q, const float* nested_absmax,
                                         const float* code, const float* offset, int64_t blocksize,
                                         int64_t n, float* out, cudaStream_t stream);
// Whether launch_nf4_gemv takes these operands: K % 8 == 0, packed 4-byte and x 16-byte aligned.
bool nf4_gemv_supported(int64_t K, const uint8_t* packed, const void* x);
// x [M, K] (kind), W [N, K] 4-bit -> y [M, N] fp32 = x W^T. One warp per output column and group of
// 4 rows of x; cudaErrorInvalidValue unless nf4_gemv_supported.
cudaError_t launch_nf4_gemv(FloatKind kind, const void* x, int64_t M, int64_t K, int64_t N,
                            const uint8_t* packed, const float* absmax, const float* code,
                            int64_t blocksize, float* y, cudaStream_t stream);

}  // namespace nf4
}  // namespace peftx
