// Launchers of the DoRA CUDA kernels: raw pointers and a stream in, no torch types, so dora_cuda.cu
// compiles without ATen headers. Every pointer is device memory and contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dora/dora_math.h"

namespace peftx {
namespace dora {

// W [rows, cols] 4-bit (packed, absmax fp32, code [16]), A [r, cols] fp32, B [rows, r] fp32
// -> norm [rows] fp32 = ||dequant(W)[o] + scale * (B A)[o]||_2. One warp per row.
cudaError_t launch_nf4_lora_row_norm(const uint8_t* packed, const float* absmax, const float* code,
                                     int64_t blocksize, int64_t rows, int64_t cols, const float* A,
                                     const float* B, int64_t r, float scale, float* norm,
                                     cudaStream_t stream);

// W [rows, cols] dense (dt), A [r, cols] fp32, B [rows, r] fp32 -> norm [rows] fp32 =
// ||W[o] + scale * (B A)[o]||_2. One warp per row.
cudaError_t launch_dense_lora_row_norm(const void* W, DenseDt dt, int64_t rows, int64_t cols, const float* A,
                                       const float* B, int64_t r, float scale, float* norm, cudaStream_t stream);

}  // namespace dora
}  // namespace peftx
