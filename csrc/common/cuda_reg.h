// Helpers of the CUDA registrations (host code with torch headers): the launcher dtype tag of a
// tensor dtype, and the current stream.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "common/float_kind.h"

namespace peftx {

inline FloatKind kind_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return FloatKind::f32;
    case at::kHalf:
      return FloatKind::f16;
    case at::kBFloat16:
      return FloatKind::bf16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t, " (expected float32, float16 or bfloat16)");
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace peftx
