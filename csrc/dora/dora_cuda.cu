// DoRA CUDA kernels: the row norm of W + scale * B A (dora_math.h) for an NF4 and a dense W, one warp
// per row. The lane work is dora_math.h's row_norm_lane_partial / dense_row_norm_lane_partial;
// dora_emulate.cpp runs it over the whole grid.
#include <cuda_runtime.h>

#include "dora/dora_cuda.h"
#include "dora/dora_math.h"

namespace peftx {
namespace dora {

constexpr int kThreads = nf4::kCudaThreads;
constexpr int kWarp = nf4::kWarp;

// Grid: one warp per row o; block = kThreads threads. The bounds test is per warp and every lane
// reaches the shuffles, so the full-mask __shfl_down_sync is safe.
__global__ void nf4_lora_row_norm_kernel(const uint8_t* packed, const float* absmax, const float* code,
                                         int64_t blocksize, int64_t rows, int64_t cols, const float* A,
                                         const float* B, int64_t r, float scale, float* norm) {
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (o >= rows) return;
  float acc = row_norm_lane_partial(o, lane, kWarp, packed, absmax, code, blocksize, cols, A, B, r, scale);
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) norm[o] = sqrtf(acc);
}

// Grid and warp sum as nf4_lora_row_norm_kernel, over a dense W of T.
template <typename T>
__global__ void dense_lora_row_norm_kernel(const T* W, int64_t rows, int64_t cols, const float* A, const float* B,
                                           int64_t r, float scale, float* norm) {
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (o >= rows) return;
  float acc = dense_row_norm_lane_partial(o, lane, kWarp, W, cols, A, B, r, scale);
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) norm[o] = sqrtf(acc);
}

cudaError_t launch_nf4_lora_row_norm(const uint8_t* packed, const float* absmax, const float* code,
                                     int64_t blocksize, int64_t rows, int64_t cols, const float* A,
                                     const float* B, int64_t r, float scale, float* norm,
                                     cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int rows_per_block = kThreads / kWarp;
  const auto grid = static_cast<unsigned int>((rows + rows_per_block - 1) / rows_per_block);
  nf4_lora_row_norm_kernel<<<grid, kThreads, 0, stream>>>(packed, absmax, code, blocksize, rows, cols, A, B, r,
                                                          scale, norm);
  return cudaGetLastError();
}

cudaError_t launch_dense_lora_row_norm(const void* W, DenseDt dt, int64_t rows, int64_t cols, const float* A,
                                       const float* B, int64_t r, float scale, float* norm, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int rows_per_block = kThreads / kWarp;
  const auto grid = static_cast<unsigned int>((rows + rows_per_block - 1) / rows_per_block);
  switch (dt) {
    case DenseDt::kF32:
      dense_lora_row_norm_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(W), rows, cols, A, B, r,
                                                                scale, norm);
      break;
    case DenseDt::kF16:
      dense_lora_row_norm_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const f16_t*>(W), rows, cols, A, B, r,
                                                                scale, norm);
      break;
    case DenseDt::kBF16:
      dense_lora_row_norm_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const bf16_t*>(W), rows, cols, A, B, r,
                                                                scale, norm);
      break;
  }
  return cudaGetLastError();
}

}  // namespace dora
}  // namespace peftx
