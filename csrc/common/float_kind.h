// The floating dtypes of kernel arguments as the header-free CUDA launchers see them, and (in .cu
// files) the dispatch from that tag to the storage types of common/host_device.h.
#pragma once

#include "common/host_device.h"

#if defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace peftx {

enum class FloatKind : int { f32 = 0, f16 = 1, bf16 = 2 };

#if defined(__CUDACC__)
// Calls fn(static_cast<T*>(nullptr)) with T = float, f16_t or bf16_t; returns the launch status.
template <typename Fn>
cudaError_t with_float_kind(FloatKind kind, Fn&& fn) {
  switch (kind) {
    case FloatKind::f32:
      fn(static_cast<float*>(nullptr));
      break;
    case FloatKind::f16:
      fn(static_cast<f16_t*>(nullptr));
      break;
    case FloatKind::bf16:
      fn(static_cast<bf16_t*>(nullptr));
      break;
  }
  return cudaGetLastError();
}
#endif

}  // namespace peftx
