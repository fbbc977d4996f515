// CUDA kernels of the LoRA ops: the element-wise dropout passes and the mixed-adapter shrink /
// expand. Dense products run in cuBLAS through at::mm (lora_cuda_reg.cpp). Each kernel's thread
// calls its per-thread function in lora_math.h (a dropout thread takes the 8 elements of one Philox
// block; a shrink / expand thread one output); no intra-block cooperation.
#include "lora/lora_cuda.h"

#include <type_traits>

namespace peftx {
namespace lora {
namespace {

constexpr int kThreads = 256;

// One thread per Philox block: 8 elements, a 16-bit half of a random word each.
template <typename T>
__global__ void lora_dropout_kernel(const T* x, int64_t n, Dropout d, T* xd) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kDropBlock * q < n) dropout_apply_block(q, x, n, d, xd);
}

template <typename T>
__global__ void lora_dropout_axpy_kernel(const T* t, int64_t n, Dropout d, T* dx) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kDropBlock * q < n) dropout_axpy_block(q, t, n, d, dx);
}

template <typename T>
__global__ void lora_multi_shrink_kernel(const T* x, int64_t M, int64_t K, const T* A, int64_t R,
                                         const int64_t* ids, float* u) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < M * R) u[i] = multi_shrink_one(i / R, i % R, x, K, A, R, ids);
}

template <typename T>
__global__ void lora_multi_expand_kernel(const float* u, int64_t M, int64_t R, const T* B, int64_t N,
                                         const float* s, const int64_t* ids, T* y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < M * N) multi_expand_one(i / N, i % N, u, R, B, N, s, ids, y);
}

unsigned grid(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_lora_dropout(FloatKind kind, const void* x, int64_t n, Dropout d, void* xd,
                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return with_float_kind(kind, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    lora_dropout_kernel<T><<<grid((n + kDropBlock - 1) / kDropBlock), kThreads, 0, stream>>>(static_cast<const T*>(x), n, d,
                                                                    static_cast<T*>(xd));
  });
}

cudaError_t launch_lora_dropout_axpy(FloatKind kind, const void* t, int64_t n, Dropout d, void* dx,
                                     cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return with_float_kind(kind, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    lora_dropout_axpy_kernel<T><<<grid((n + kDropBlock - 1) / kDropBlock), kThreads, 0, stream>>>(static_cast<const T*>(t), n, d,
                                                                  static_cast<T*>(dx));
  });
}

cudaError_t launch_lora_multi_shrink(FloatKind kind, const void* x, int64_t M, int64_t K, const void* A,
                                     int64_t R, const int64_t* ids, float* u, cudaStream_t stream) {
  if (M * R == 0) return cudaSuccess;
  return with_float_kind(kind, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    lora_multi_shrink_kernel<T><<<grid(M * R), kThreads, 0, stream>>>(static_cast<const T*>(x), M, K,
                                                                      static_cast<const T*>(A), R, ids, u);
  });
}

cudaError_t launch_lora_multi_expand(FloatKind kind, const float* u, int64_t M, int64_t R, const void* B,
                                     int64_t N, const float* s, const int64_t* ids, void* y,
                                     cudaStream_t stream) {
  if (M * N == 0) return cudaSuccess;
  return with_float_kind(kind, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    lora_multi_expand_kernel<T><<<grid(M * N), kThreads, 0, stream>>>(u, M, R, static_cast<const T*>(B), N, s,
                                                                      ids, static_cast<T*>(y));
  });
}

}  // namespace lora
}  // namespace peftx
