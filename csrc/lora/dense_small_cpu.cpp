#include "lora/dense_small_cpu.h"

#include <ATen/Parallel.h>

#include "common/cpu_isa.h"
#include "lora/cpu/dense_small.h"

namespace peftx {
namespace lora {
namespace {

bool applies(const at::Tensor& a2, const at::Tensor& weight, int64_t k_multiple, int64_t max_tokens) {
  const auto dt = a2.scalar_type();
  if (!a2.is_cpu() || a2.size(0) == 0 || a2.size(0) > max_tokens) return false;
  if (dt != at::kFloat && dt != at::kBFloat16) return false;
  if (weight.scalar_type() != dt || !weight.is_contiguous() || weight.size(1) % k_multiple != 0) return false;
  if (cpu_isa() != CpuIsa::avx512) return false;
  return dt == at::kFloat || cpu_has_avx512bf16();
}

}  // namespace

at::Tensor dense_small_forward(const at::Tensor& x2, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t max_tokens =
      x2.scalar_type() == at::kBFloat16 ? kDenseSmallMaxTokensBf16Forward : kDenseSmallMaxTokens;
  if (!applies(x2, weight, 32, max_tokens)) return {};
  const int64_t M = x2.size(0), N = weight.size(0), K = weight.size(1);
  at::Tensor y = at::empty({M, N}, x2.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  // Whole groups of 8 rows per task.
  at::parallel_for(0, (N + 7) / 8, 16, [&](int64_t g0, int64_t g1) {
    const int64_t n0 = g0 * 8, n1 = std::min(N, g1 * 8);
    if (x2.scalar_type() == at::kFloat) {
      cpu::dense_rows_f32(weight.const_data_ptr<float>(), x2.const_data_ptr<float>(), M, K, n0, n1, yp, N);
    } else {
      cpu::dense_rows_bf16(static_cast<const uint16_t*>(weight.const_data_ptr()),
                           static_cast<const uint16_t*>(x2.const_data_ptr()), M, K, n0, n1, yp, N);
    }
  });
  if (bias.has_value()) y.add_(bias->to(at::kFloat));  // fp32 sum, then one rounding to x's dtype
  return y.to(x2.scalar_type());
}

at::Tensor dense_small_input_grad(const at::Tensor& g2, const at::Tensor& weight) {
  const bool bf16 = g2.scalar_type() == at::kBFloat16;
  const int64_t chunk = bf16 ? 128 : 64;
  if (!applies(g2, weight, chunk, kDenseSmallMaxTokens)) return {};
  const int64_t M = g2.size(0), N = weight.size(0), K = weight.size(1);
  // bf16 pairs rows (n, n + 1): g gets a zero column when N is odd.
  const at::Tensor g = bf16 && N % 2 != 0 ? at::constant_pad_nd(g2, {0, 1}) : g2;
  const int64_t ldg = g.size(1);
  at::Tensor dx = at::empty({M, K}, g2.options().dtype(at::kFloat));
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, K / chunk, 1, [&](int64_t c0, int64_t c1) {
    if (bf16) {
      cpu::dense_t_bf16(static_cast<const uint16_t*>(weight.const_data_ptr()),
                        static_cast<const uint16_t*>(g.const_data_ptr()), ldg, M, N, K, c0 * chunk, c1 * chunk, dp);
    } else {
      cpu::dense_t_f32(weight.const_data_ptr<float>(), g.const_data_ptr<float>(), ldg, M, N, K, c0 * chunk,
                       c1 * chunk, dp);
    }
  });
  return dx.to(g2.scalar_type());
}

}  // namespace lora
}  // namespace peftx
