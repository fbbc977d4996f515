// Launchers of the LoRA CUDA kernels: raw pointers and a stream in, no torch types, so
// lora_cuda.cu compiles without ATen headers. Every pointer is contiguous device memory; `kind` is
// the dtype of every floating tensor except u and s (fp32). Each returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lora/lora_math.h"
#include "common/float_kind.h"

namespace peftx {
namespace lora {

// x [n] -> xd [n] = dropout(x) under d (element i of the flattened [tokens, in] input).
cudaError_t launch_lora_dropout(FloatKind kind, const void* x, int64_t n, Dropout d, void* xd,
                                cudaStream_t stream);
// dx [n] += dropout'(t) [n]: the masked LoRA term of the input gradient.
cudaError_t launch_lora_dropout_axpy(FloatKind kind, const void* t, int64_t n, Dropout d, void* dx,
                                     cudaStream_t stream);
// x [M, K], A [n, R, K], ids [M] -> u [M, R] fp32 (one thread per output).
cudaError_t launch_lora_multi_shrink(FloatKind kind, const void* x, int64_t M, int64_t K, const void* A,
                                     int64_t R, const int64_t* ids, float* u, cudaStream_t stream);
// y [M, N] += s[ids] * u [M, R] B[ids]^T with B [n, N, R] (one thread per output).
cudaError_t launch_lora_multi_expand(FloatKind kind, const float* u, int64_t M, int64_t R, const void* B,
                                     int64_t N, const float* s, const int64_t* ids, void* y,
                                     cudaStream_t stream);

}  // namespace lora
}  // namespace peftx
