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
Out convert(const T& v) {
  if constexpr (sizeof(Out) == 4) {
    return to_float(v);
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    return v;  // bf16 to bf16: the bits as they are
  } else {
    return bf16_from_float(to_float(v));  // exact: x is bf16-representable here
  }
}

// Chunk by chunk, features 2i and 2i + 1 of a chunk go to positions i of its even and odd halves;
// the padding past cols (to a whole chunk, plus one spare chunk) is 0. Loops without divisions, so
// the compiler vectorizes the even / odd copies.
template <typename T, typename Out>
void pack(const T* x, int64_t tokens, int64_t cols, int64_t ldx, int64_t chunk, Out* out) {
  const int64_t stride = gemv_x_stride(cols, chunk), half = chunk / 2, full = cols / chunk * chunk;
  for (int64_t m = 0; m < tokens; ++m) {
    const T* xr = x + m * ldx;
    Out* o = out + m * stride;
    for (int64_t c = 0; c < full; c += chunk) {
      for (int64_t i = 0; i < half; ++i) {
        o[c + i] = convert<T, Out>(xr[c + 2 * i]);
        o[c + half + i] = convert<T, Out>(xr[c + 2 * i + 1]);
      }
    }
    for (int64_t k = full; k < stride; ++k) {
      const int64_t c = k / chunk * chunk, r = k - c;
      o[c + (r & 1) * half + r / 2] = k < cols ? convert<T, Out>(xr[k]) : Out{};
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
