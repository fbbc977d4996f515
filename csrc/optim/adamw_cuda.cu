// Fused AdamW CUDA kernels. Each thread's work is a __host__ __device__ function of its grid indices
// from adamw_math.h; the CPU emulation (adamw_emulate.cpp) runs the same functions over the grid.
#include <cuda_runtime.h>

#include <type_traits>

#include "optim/adamw_cuda.h"
#include "optim/adamw_math.h"

namespace peftx {
namespace optim {

static_assert(kThreads == kQuantBlock, "the 8-bit kernel maps one thread to each element of a block");

template <typename T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const AdamWTensor* tensors, const WorkItem* items,
                                                         AdamWHyper h) {
  adamw_thread<T>(blockIdx.x, static_cast<int>(threadIdx.x), tensors, items, h);
}

// Max of v over the block's threads (integer max: exact and order-free), returned to every thread.
__device__ __forceinline__ uint32_t block_max(uint32_t v, uint32_t* scratch) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, off));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : 0u;
    for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, off));
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) adamw8_kernel(const AdamW8Tensor* tensors, const WorkItem* items,
                                                          AdamWHyper h, const QuantTables* tables) {
  __shared__ uint32_t scratch_m[kThreads / 32], scratch_v[kThreads / 32];
  const int thread = static_cast<int>(threadIdx.x);
  Moments s{0.0f, 0.0f};
  const bool active = adamw8_thread_update<T>(blockIdx.x, thread, tensors, items, h, *tables, s);
  // Every thread reaches both reductions (no early return), so the full-mask shuffles are safe.
  const uint32_t m_bits = block_max(active ? abs_bits(s.m) : 0u, scratch_m);
  const uint32_t v_bits = block_max(active ? abs_bits(s.v) : 0u, scratch_v);
  adamw8_thread_store(blockIdx.x, thread, tensors, items, s, m_bits, v_bits, *tables);
}

namespace {

template <typename P>
using pointee = std::remove_pointer_t<P>;

}  // namespace

cudaError_t launch_adamw(FloatKind kind, const AdamWTensor* tensors, const WorkItem* items, int64_t n_items,
                         AdamWHyper h, cudaStream_t stream) {
  if (n_items == 0) return cudaSuccess;
  return with_float_kind(kind, [&](auto tag) {
    using T = pointee<decltype(tag)>;
    adamw_kernel<T><<<static_cast<unsigned int>(n_items), kThreads, 0, stream>>>(tensors, items, h);
  });
}

cudaError_t launch_adamw8(FloatKind kind, const AdamW8Tensor* tensors, const WorkItem* items, int64_t n_items,
                          AdamWHyper h, const QuantTables* tables, cudaStream_t stream) {
  if (n_items == 0) return cudaSuccess;
  return with_float_kind(kind, [&](auto tag) {
    using T = pointee<decltype(tag)>;
    adamw8_kernel<T><<<static_cast<unsigned int>(n_items), kThreads, 0, stream>>>(tensors, items, h, tables);
  });
}

}  // namespace optim
}  // namespace peftx
