// One switch from a runtime element type (Dt) to the C++ type a raw-pointer kernel template takes.
#pragma once

#include "common/host_device.h"
#include "nf4/cpu/kernels.h"

namespace peftx {
namespace nf4 {
namespace cpu {

// Calls f(tag), tag a null T* for T the element type of dt (float, bf16_t or f16_t); use
// `using T = std::remove_pointer_t<decltype(tag)>;` inside f.
template <typename F>
inline void with_dt(Dt dt, F&& f) {
  switch (dt) {
    case Dt::kF32:
      return f(static_cast<float*>(nullptr));
    case Dt::kBF16:
      return f(static_cast<bf16_t*>(nullptr));
    case Dt::kF16:
      return f(static_cast<f16_t*>(nullptr));
  }
}

}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
