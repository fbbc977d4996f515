// The GemvX activation layout (kernels.h): converted once per call, read by every row.
#include <algorithm>
#include <type_traits>

#include "common/host_device.h"
#include "nf4/cpu/dt_dispatch.h"
#include "nf4/cpu/kernels.h"

namespace peftx {
namespace nf4 {
namespace cpu {
namespace {

template <typename T, typename Out>
void pack(const T* x, int64_t tokens, int64_t cols, int64_t ldx, int64_t chunk, Out* out) {
  const int64_t stride = gemv_x_stride(cols, chunk), half = chunk / 2;
  for (int64_t m = 0; m < tokens; ++m) {
    const T* xr = x + m * ldx;
    Out* o = out + m * stride;
    for (int64_t k = 0; k < stride; ++k) {
      // Feature k sits at chunk (k / chunk), position (k % chunk) / 2 of its even or odd half.
      const int64_t c = k / chunk * chunk, r = k - c;
      const float v = k < cols ? to_float(xr[k]) : 0.0f;
      Out* slot = o + c + (r & 1) * half + r / 2;
      if constexpr (sizeof(Out) == 4) {
        *slot = v;
      } else {
        *slot = bf16_from_float(v);  // exact: x is bf16 (or 0) here
      }
    }
  }
}

template <typename T>
void pack_from(const T* x, int64_t tokens, int64_t cols, int64_t ldx, int64_t chunk, bool bf16, void* out) {
  if (bf16) {
    pack(x, tokens, cols, ldx, chunk, static_cast<bf16_t*>(out));
  } else {
    pack(x, tokens, cols, ldx, chunk, static_cast<float*>(out));
  }
}

}  // namespace

void gemv_pack_x(const void* x, Dt dt, int64_t tokens, int64_t cols, int64_t ldx, int64_t chunk, bool bf16,
                 void* out) {
  with_dt(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pack_from(static_cast<const T*>(x), tokens, cols, ldx, chunk, bf16, out);
  });
}

}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
