// Maps a torch floating dtype to the storage type the shared kernels are templated on.
#pragma once

#include <ATen/ATen.h>

#include "common/host_device.h"

namespace peftx {

template <typename T>
struct type_tag {
  using type = T;
};

// Calls fn(type_tag<T>{}) with T = float, f16_t or bf16_t for the given dtype.
template <typename Fn>
decltype(auto) dispatch_float(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(type_tag<float>{});
    case at::kHalf:
      return fn(type_tag<f16_t>{});
    case at::kBFloat16:
      return fn(type_tag<bf16_t>{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (expected float32, float16 or bfloat16)");
  }
}

}  // namespace peftx
