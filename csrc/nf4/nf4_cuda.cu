// NF4 CUDA kernels. Each thread's work is a __host__ __device__ function of its grid indices from
// nf4_math.h; the CPU emulation (nf4_emulate.cpp) runs the same functions over the whole grid.
#include <cuda_runtime.h>

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

// Grid: x = one warp per output (m, o), outputs numbered m * N + o; block = kThreads threads.
// Invariant for the shuffles: the whole warp maps to one output and every lane reaches them
// (the bounds test is per warp), so full-mask __shfl_down_sync is safe.
template <typename T>
__global__ void nf4_gemv_kernel(const T* x, int64_t M, int64_t K, int64_t N, const uint8_t* packed,
                                const float* absmax, const float* code, int64_t blocksize, float* y) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= M * N) return;
  const int64_t m = warp / N, o = warp % N;
  float acc = gemv_lane_partial(m, o, lane, kWarp, x, K, K, packed, absmax, code, blocksize);
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) y[warp] = acc;
}

template <typename T>
__global__ void nf4_gemv_t_kernel(const T* g, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                                  const float* absmax, const float* code, int64_t blocksize,
                                  float* dx) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= M * K) return;
  const int64_t m = t / K, k = t % K;
  dx[t] = gemv_t_one(m, k, g, N, N, K, packed, absmax, code, blocksize);
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
  return with_kind(kind, [&](auto tag) {
    using T = pointee<decltype(tag)>;
    nf4_dequantize_kernel<T><<<grid_for(bytes, kThreads), kThreads, 0, stream>>>(
        packed, absmax, code, blocksize, n, static_cast<T*>(out));
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

cudaError_t launch_nf4_gemv(FloatKind kind, const void* x, int64_t M, int64_t K, int64_t N,
                            const uint8_t* packed, const float* absmax, const float* code,
                            int64_t blocksize, float* y, cudaStream_t stream) {
  if (M * N == 0) return cudaSuccess;
  return with_kind(kind, [&](auto tag) {
    using T = pointee<decltype(tag)>;
    nf4_gemv_kernel<T><<<grid_for(M * N, kThreads / kWarp), kThreads, 0, stream>>>(
        static_cast<const T*>(x), M, K, N, packed, absmax, code, blocksize, y);
  });
}

cudaError_t launch_nf4_gemv_t(FloatKind kind, const void* g, int64_t M, int64_t N, int64_t K,
                              const uint8_t* packed, const float* absmax, const float* code,
                              int64_t blocksize, float* dx, cudaStream_t stream) {
  if (M * K == 0) return cudaSuccess;
  return with_kind(kind, [&](auto tag) {
    using T = pointee<decltype(tag)>;
    nf4_gemv_t_kernel<T><<<grid_for(M * K, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(g), M, N, K, packed, absmax, code, blocksize, dx);
  });
}

}  // namespace nf4
}  // namespace peftx
