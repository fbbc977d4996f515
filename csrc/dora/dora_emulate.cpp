// CPU emulation of the DoRA CUDA grid (test-only op peftx_emulate::nf4_lora_row_norm_kernel): every
// thread of the launch dora_cuda.cu makes, the kernel's per-warp bounds test, dora_math.h's lane
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

at::Tensor row_norm_grid(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  auto [A, B] = check_row_norm_args(packed, absmax, code, blocksize, lora_A, lora_B);
  const int64_t rows = B.size(0), cols = A.size(1), r = A.size(0);
  const at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  at::Tensor norm = at::zeros({rows}, packed.options().dtype(at::kFloat));
  constexpr int64_t kThreads = nf4::kCudaThreads, kWarp = nf4::kWarp;
  const int64_t grid = (rows + kThreads / kWarp - 1) / (kThreads / kWarp);
  std::array<float, nf4::kWarp> lanes{};
  for (int64_t t = 0; t < grid * kThreads; ++t) {
    const int64_t o = t / kWarp;
    const int lane = static_cast<int>(t % kWarp);
    if (o >= rows) continue;
    lanes[lane] = row_norm_lane_partial(o, lane, nf4::kWarp, pk.const_data_ptr<uint8_t>(), am.const_data_ptr<float>(),
                                        cd.const_data_ptr<float>(), blocksize, cols, A.const_data_ptr<float>(),
                                        B.const_data_ptr<float>(), r, static_cast<float>(scale));
    if (lane == kWarp - 1) norm.data_ptr<float>()[o] = std::sqrt(nf4::warp_tree_sum(lanes.data()));
  }
  return norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx_emulate, CPU, m) { m.impl("nf4_lora_row_norm_kernel", &row_norm_grid); }

}  // namespace dora
}  // namespace peftx
