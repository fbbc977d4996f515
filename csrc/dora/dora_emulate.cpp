// CPU emulation of the DoRA CUDA grids (test-only ops peftx_emulate::nf4_lora_row_norm_kernel and
// dense_lora_row_norm_kernel): every thread of the launches dora_cuda.cu makes, the kernel's per-warp bounds test, dora_math.h's lane
// function, and the warp sum in the shuffle's order (nf4::warp_tree_sum).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>

#include "dora/dora_checks.h"
#include "dora/dora_math.h"

namespace peftx {
namespace dora {
namespace {

// Every thread of a launch of one warp per row (rows rows): lane_partial(o, lane, lanes) per thread,
// the warp's partials summed in the shuffle's order, norm[o] their sqrt.
template <typename LanePartial>
void warp_per_row_grid(int64_t rows, float* norm, LanePartial&& lane_partial) {
  constexpr int64_t kThreads = nf4::kCudaThreads, kWarp = nf4::kWarp;
  const int64_t grid = (rows + kThreads / kWarp - 1) / (kThreads / kWarp);
  std::array<float, nf4::kWarp> lanes{};
  for (int64_t t = 0; t < grid * kThreads; ++t) {
    const int64_t o = t / kWarp;
    const int lane = static_cast<int>(t % kWarp);
    if (o >= rows) continue;
    lanes[lane] = lane_partial(o, lane, static_cast<int>(kWarp));
    if (lane == kWarp - 1) norm[o] = std::sqrt(nf4::warp_tree_sum(lanes.data()));
  }
}

at::Tensor row_norm_grid(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  auto [A, B] = check_row_norm_args(packed, absmax, code, blocksize, lora_A, lora_B);
  const int64_t rows = B.size(0), cols = A.size(1), r = A.size(0);
  const at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  at::Tensor norm = at::zeros({rows}, packed.options().dtype(at::kFloat));
  warp_per_row_grid(rows, norm.data_ptr<float>(), [&](int64_t o, int lane, int lanes) {
    return row_norm_lane_partial(o, lane, lanes, pk.const_data_ptr<uint8_t>(), am.const_data_ptr<float>(),
                                 cd.const_data_ptr<float>(), blocksize, cols, A.const_data_ptr<float>(),
                                 B.const_data_ptr<float>(), r, static_cast<float>(scale));
  });
  return norm;
}

template <typename T>
void dense_grid(const T* W, int64_t rows, int64_t cols, const float* A, const float* B, int64_t r, float scale,
                float* norm) {
  warp_per_row_grid(rows, norm, [&](int64_t o, int lane, int lanes) {
    return dense_row_norm_lane_partial(o, lane, lanes, W, cols, A, B, r, scale);
  });
}

at::Tensor dense_row_norm_grid(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                               double scale) {
  auto [W, A, B] = check_dense_row_norm_args(weight, lora_A, lora_B);
  const int64_t rows = W.size(0), cols = W.size(1), r = A.size(0);
  at::Tensor norm = at::zeros({rows}, W.options().dtype(at::kFloat));
  const float* a = A.const_data_ptr<float>();
  const float* b = B.const_data_ptr<float>();
  float* out = norm.data_ptr<float>();
  const float s = static_cast<float>(scale);
  switch (W.scalar_type()) {
    case at::kFloat:
      dense_grid(W.const_data_ptr<float>(), rows, cols, a, b, r, s, out);
      break;
    case at::kHalf:
      dense_grid(static_cast<const f16_t*>(W.const_data_ptr()), rows, cols, a, b, r, s, out);
      break;
    default:
      dense_grid(static_cast<const bf16_t*>(W.const_data_ptr()), rows, cols, a, b, r, s, out);
      break;
  }
  return norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx_emulate, CPU, m) {
  m.impl("nf4_lora_row_norm_kernel", &row_norm_grid);
  m.impl("dense_lora_row_norm_kernel", &dense_row_norm_grid);
}

}  // namespace dora
}  // namespace peftx
