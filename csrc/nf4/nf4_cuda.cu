// NF4 CUDA kernels. Each thread's work is a __host__ __device__ function of its grid indices from
// nf4_math.h; the CPU emulation (nf4_emulate.cpp) runs the same functions over the whole grid.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "nf4/nf4_cuda.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace {

constexpr int kThreads = kCudaThreads;

inline unsigned int grid_for(int64_t work, int per_block) {
  return static_cast<unsigned int>((work + per_block - 1) / per_block);
}

}  // namespace

template <typename T>
__global__ void nf4_quantize_kernel(const T* w, int64_t n, int64_t blocksize, uint8_t* packed,
                                    float* absmax) {
  const int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (block < num_blocks(n, blocksize)) quantize_block(block, w, n, blocksize, packed, absmax);
}

template <typename T>
__global__ void nf4_dequantize_kernel(const uint8_t* packed, const float* absmax, const float* code,
                                      int64_t blocksize, int64_t n, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < (n + 1) / 2) dequantize_byte(i, packed, absmax, code, blocksize, n, out);
}

// One thread per 8 elements: a 32-bit load of W, one absmax, 16-byte stores (packed 4-byte and out
// 16-byte aligned; launch_nf4_dequantize checks).
template <typename T>
__global__ void nf4_dequantize8_kernel(const uint8_t* packed, const float* absmax, const float* code,
                                       int64_t blocksize, int bshift, int64_t n, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < (n + 7) / 8) dequantize_oct(i, packed, absmax, code, blocksize, bshift, n, out);
}

__global__ void nf4_double_quantize_kernel(const float* x, int64_t n, int64_t blocksize,
                                           const float* code, uint8_t* q, float* absmax) {
  const int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (block < num_blocks(n, blocksize)) quantize8_block(block, x, n, blocksize, code, q, absmax);
}

__global__ void nf4_double_dequantize_kernel(const uint8_t* q, const float* nested_absmax,
                                             const float* code, const float* offset,
                                             int64_t blocksize, int64_t n, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = decode_absmax(i, q, nested_absmax, code, blocksize, *offset);
}

// Grid: x = one warp per output column o (kThreads / kWarp per block), y = groups of kGemvWarpRows
// rows of x. Invariant for the shuffles: the whole warp maps to one o and every lane reaches them
// (the bounds test is per warp), so full-mask __shfl_down_sync is safe.
template <typename T>
__global__ void nf4_gemv_kernel(const T* x, int64_t M, int64_t K, int64_t N, const uint8_t* packed,
                                const float* absmax, const float* code, int bshift, float* y) {
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kGemvWarpRows;
  if (o >= N) return;
  float acc[kGemvWarpRows];
  gemv_lane_partials(m0, M, o, lane, x, K, packed, absmax, code, bshift, acc);
#pragma unroll
  for (int r = 0; r < kGemvWarpRows; ++r)
    for (int offset = 16; offset > 0; offset >>= 1) acc[r] += __shfl_down_sync(0xffffffffu, acc[r], offset);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kGemvWarpRows; ++r)
      if (m0 + r < M) y[(m0 + r) * N + o] = acc[r];
  }
}

namespace {

template <typename Fn>
cudaError_t with_kind(FloatKind kind, Fn&& fn) {
  switch (kind) {
    case FloatKind::f32:
      fn(static_cast<const float*>(nullptr));
      break;
    case FloatKind::f16:
      fn(static_cast<const f16_t*>(nullptr));
      break;
    case FloatKind::bf16:
      fn(static_cast<const bf16_t*>(nullptr));
      break;
  }
  return cudaGetLastError();
}

template <typename P>
using pointee = std::remove_const_t<std::remove_pointer_t<P>>;

}  // namespace

cudaError_t launch_nf4_quantize(FloatKind kind, const void* w, int64_t n, int64_t blocksize,
                                uint8_t* packed, float* absmax, cudaStream_t stream) {
  const int64_t blocks = num_blocks(n, blocksize);
  if (blocks == 0) return cudaSuccess;
  return with_kind(kind, [&](auto tag) {
    using T = pointee<decltype(tag)>;
    nf4_quantize_kernel<T><<<grid_for(blocks, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(w), n, blocksize, packed, absmax);
  });
}

cudaError_t launch_nf4_dequantize(FloatKind kind, const uint8_t* packed, const float* absmax,
                                  const float* code, int64_t blocksize, int64_t n, void* out,
                                  cudaStream_t stream) {
  const int64_t bytes = (n + 1) / 2;
  if (bytes == 0) return cudaSuccess;
  const bool vec = reinterpret_cast<uintptr_t>(packed) % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  return with_kind(kind, [&](auto tag) {
    using T = pointee<decltype(tag)>;
    if (vec) {
      nf4_dequantize8_kernel<T><<<grid_for((n + 7) / 8, kThreads), kThreads, 0, stream>>>(
          packed, absmax, code, blocksize, block_shift(blocksize), n, static_cast<T*>(out));
    } else {
      nf4_dequantize_kernel<T><<<grid_for(bytes, kThreads), kThreads, 0, stream>>>(
          packed, absmax, code, blocksize, n, static_cast<T*>(out));
    }
  });
}

cudaError_t launch_nf4_double_quantize(const float* x, int64_t n, int64_t blocksize,
                                       const float* code, uint8_t* q, float* absmax,
                                       cudaStream_t stream) {
  const int64_t blocks = num_blocks(n, blocksize);
  if (blocks == 0) return cudaSuccess;
  nf4_double_quantize_kernel<<<grid_for(blocks, kThreads), kThreads, 0, stream>>>(x, n, blocksize,
                                                                                  code, q, absmax);
  return cudaGetLastError();
}

cudaError_t launch_nf4_double_dequantize(const uint8_t* q, const float* nested_absmax,
                                         const float* code, const float* offset, int64_t blocksize,
                                         int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  nf4_double_dequantize_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(
      q, nested_absmax, code, offset, blocksize, n, out);
  return cudaGetLastError();
}

bool nf4_gemv_supported(int64_t K, const uint8_t* packed, const void* x) {
  return K % 8 == 0 && reinterpret_cast<uintptr_t>(packed) % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

cudaError_t launch_nf4_gemv(FloatKind kind, const void* x, int64_t M, int64_t K, int64_t N,
                            const uint8_t* packed, const float* absmax, const float* code,
                            int64_t blocksize, float* y, cudaStream_t stream) {
  if (M * N == 0) return cudaSuccess;
  if (!nf4_gemv_supported(K, packed, x)) return cudaErrorInvalidValue;
  const dim3 grid(grid_for(N, kThreads / kWarp), static_cast<unsigned int>((M + kGemvWarpRows - 1) / kGemvWarpRows));
  return with_kind(kind, [&](auto tag) {
    using T = pointee<decltype(tag)>;
    nf4_gemv_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), M, K, N, packed, absmax, code,
                                                      block_shift(blocksize), y);
  });
}

}  // namespace nf4
}  // namespace peftx
