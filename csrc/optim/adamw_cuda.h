// Launchers of the fused AdamW CUDA kernels: raw pointers and a stream in, no torch types, so
// adamw_cuda.cu compiles without ATen headers. `tensors`, `items` and `tables` are device copies of
// the host-built structs of adamw_math.h / dynamic_map.h. Each returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "nf4/nf4_cuda.h"
#include "optim/adamw_math.h"

namespace peftx {
namespace optim {

using nf4::FloatKind;

// One block of kThreads threads per work item (kChunk elements of one tensor).
cudaError_t launch_adamw(FloatKind kind, const AdamWTensor* tensors, const WorkItem* items, int64_t n_items,
                         AdamWHyper h, cudaStream_t stream);
// One block of kThreads = kQuantBlock threads per work item (one quantization block).
cudaError_t launch_adamw8(FloatKind kind, const AdamW8Tensor* tensors, const WorkItem* items, int64_t n_items,
                          AdamWHyper h, const QuantTables* tables, cudaStream_t stream);

}  // namespace optim
}  // namespace peftx
