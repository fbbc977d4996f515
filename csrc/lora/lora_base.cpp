#include "lora/lora_base.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstddef>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "lora/dense_small_cpu.h"
#include "lora/rank_bf16_cpu.h"
#include "lora/rank_f32_cpu.h"

namespace peftx {
namespace lora {

at::Tensor check_lora_args(const char* op, const at::Tensor& x, const BaseWeight& base,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, double dropout_p, bool allow_double) {
  if (!(allow_double && x.scalar_type() == at::kDouble)) PEFTX_CHECK_DTYPE_FLOAT(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension [..., in_features], got a scalar");
  const int64_t in = x.size(-1);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == in, op, ": lora_A must have shape [r, ", in,
              "] (in_features of x), got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(r > 0, op, ": lora_A must have rank r > 0, got shape ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(1) == r, op, ": lora_B must have shape [out_features, ",
              r, "] (r of lora_A), got ", lora_B.sizes());
  const int64_t out = lora_B.size(0);
  // Adapters may be kept in another precision (fp32 masters under a bf16 base): the products run
  // in x's dtype and the adapter gradients come back in the adapters' dtypes.
  for (const auto* t : {&lora_A, &lora_B}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()) && (t->scalar_type() != at::kDouble || allow_double), op,
                ": lora_A and lora_B must be float32, float16 or bfloat16, got ", t->scalar_type());
  }
  PEFTX_CHECK_SAME_DEVICE(op, "lora_A", lora_A, x);
  PEFTX_CHECK_SAME_DEVICE(op, "lora_B", lora_B, x);
  PEFTX_CHECK_SAME_DEVICE(op, "weight", base.weight, x);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (base.is_nf4()) {
    TORCH_CHECK(base.code.has_value(), op, ": code must be given with absmax for a 4-bit weight");
    PEFTX_CHECK_DTYPE(op, "weight (packed NF4)", base.weight, at::kByte);
    TORCH_CHECK(base.weight.numel() == (out * in + 1) / 2, op, ": the packed NF4 weight must hold ",
                (out * in + 1) / 2, " bytes for [", out, ", ", in, "], got ", base.weight.numel());
    check_blocksize(op, base.blocksize);
  } else {
    TORCH_CHECK(!base.code.has_value(), op, ": code is only used with absmax (a 4-bit weight)");
    TORCH_CHECK(base.weight.dim() == 2 && base.weight.size(0) == out && base.weight.size(1) == in, op,
                ": weight must have shape [", out, ", ", in, "] (lora_B's out_features, x's in_features), got ",
                base.weight.sizes());
    TORCH_CHECK(base.weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ",
                x.scalar_type(), ", got ", base.weight.scalar_type());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must have shape [", out, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
    PEFTX_CHECK_SAME_DEVICE(op, "bias", (*bias), x);
  }
  return x.reshape({-1, in}).contiguous();
}

at::Tensor check_bwd_args(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u,
                          int64_t M, int64_t R, int64_t N) {
  const auto want = leading_shape_with(x, N);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(want), op, ": grad must have shape ", at::IntArrayRef(want),
              " (x's leading dimensions, out_features), got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad must have x's dtype ", x.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(u.dim() == 2 && u.size(0) == M && u.size(1) == R && u.scalar_type() == x.scalar_type(), op,
              ": u must be the forward's [", M, ", ", R, "] ", x.scalar_type(), " tensor, got ", u.sizes(), " ",
              u.scalar_type());
  PEFTX_CHECK_SAME_DEVICE(op, "grad", grad, x);
  return grad.reshape({-1, N}).contiguous();
}

BwdParts lora_bwd_common(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u,
                         const BaseWeight& base, const at::Tensor& lora_A_in, const at::Tensor& lora_B_in,
                         double scaling, double dropout_p, bool need_dx, bool allow_double) {
  BwdParts p;
  p.x2 = check_lora_args(op, x, base, c10::nullopt, lora_A_in, lora_B_in, dropout_p, allow_double);
  p.lora_A = adapter_as(lora_A_in, p.x2.scalar_type(), 0);
  p.lora_B = adapter_as(lora_B_in, p.x2.scalar_type(), 1);
  p.M = p.x2.size(0);
  p.K = p.x2.size(1);
  p.R = p.lora_A.size(0);
  p.N = p.lora_B.size(0);
  p.g2 = check_bwd_args(op, grad, x, u, p.M, p.R, p.N);
  // dx (the step's largest allocation, [M, K]) first: allocated after dB and dA, it tended to miss
  // the hole the previous step's dx left in glibc's heap (dB had split it) and came from fresh,
  // page-faulting memory every step.
  p.dx = need_dx ? base_input_grad(p.g2, base, p.K) : at::empty({0}, p.x2.options());
  if (p.M > 0 && rank_bf16_applies(p.g2) && rank_bf16_takes(p.R)) {  // CPU only (checked there)
    // The same products on the bf16 rank-r kernels (rounded at the same points).
    std::tie(p.gBs, p.dB) = rank_gbs_gt_u_bf16(p.g2, p.lora_B, u, scaling);
  } else if (p.M > 0 && rank_f32_applies(p.g2, p.R)) {
    std::tie(p.gBs, p.dB) = rank_gbs_gt_u_f32(p.g2, p.lora_B, u, scaling);
  } else {
    p.gBs = at::mm(p.g2, p.lora_B).mul_(scaling);  // shared by all three gradients
    // As (s u)^T g, transposed: the CPU BLAS takes 0.67 ms for this orientation against 0.89 for
    // g^T (s u) (fp32, 512 x 4096, r = 16).
    p.dB = at::mm(u.mul(scaling).t(), p.g2).t().contiguous();
  }
  return p;
}

at::Tensor lora_bwd_no_dropout(BwdParts& p, bool need_dx) {
  if (need_dx && p.M > 0) p.dx.addmm_(p.gBs, p.lora_A);
  return at::mm(p.gBs.t(), p.x2);
}

at::Tensor check_multi_args(const char* op, const at::Tensor& x, const at::Tensor& base_out,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scalings,
                            const at::Tensor& adapter_ids) {
  PEFTX_CHECK_DTYPE_FLOAT(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension [..., in_features], got a scalar");
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(2) == K, op, ": lora_A must have shape [n_adapters, r, ", K,
              "], got ", lora_A.sizes());
  const int64_t n = lora_A.size(0), R = lora_A.size(1);
  TORCH_CHECK(lora_B.dim() == 3 && lora_B.size(0) == n && lora_B.size(2) == R, op,
              ": lora_B must have shape [", n, ", out_features, ", R, "] (n_adapters and r of lora_A), got ",
              lora_B.sizes());
  const int64_t N = lora_B.size(1);
  TORCH_CHECK(base_out.dim() == x.dim() && base_out.size(-1) == N &&
                  base_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              op, ": base_out must have shape [..., ", N, "] with x's leading dimensions ", x.sizes(), ", got ",
              base_out.sizes());
  for (const auto* t : {&base_out, &lora_A, &lora_B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": base_out, lora_A and lora_B must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
    PEFTX_CHECK_SAME_DEVICE(op, "base_out, lora_A and lora_B", (*t), x);
  }
  PEFTX_CHECK_DTYPE(op, "scalings", scalings, at::kFloat);
  TORCH_CHECK(scalings.dim() == 1 && scalings.size(0) == n, op, ": scalings must have shape [", n,
              "] (one per adapter), got ", scalings.sizes());
  PEFTX_CHECK_SAME_DEVICE(op, "scalings", scalings, x);
  PEFTX_CHECK_DTYPE(op, "adapter_ids", adapter_ids, at::kLong);
  TORCH_CHECK(adapter_ids.dim() == 1 && adapter_ids.size(0) == M, op, ": adapter_ids must have shape [", M,
              "] (one per row of x), got ", adapter_ids.sizes());
  PEFTX_CHECK_SAME_DEVICE(op, "adapter_ids", adapter_ids, x);
  if (M > 0) {
    const auto lo = adapter_ids.min().item<int64_t>(), hi = adapter_ids.max().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < n, op, ": adapter_ids must be in [-1, ", n, ") (-1: base only), got values in [",
                lo, ", ", hi, "]");
  }
  return x.reshape({-1, K}).contiguous();
}

at::Tensor base_forward(const at::Tensor& x2, const BaseWeight& base, int64_t out_features,
                        const c10::optional<at::Tensor>& bias) {
  if (base.is_nf4()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftx::nf4_matmul", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, int64_t, int64_t,
                                           const c10::optional<at::Tensor>&)>();
    return op.call(x2, base.weight, *base.absmax, *base.code, base.blocksize, out_features, bias);
  }
  if (at::Tensor y = dense_small_forward(x2, base.weight, bias); y.defined()) return y;
  if (bias.has_value()) return at::addmm(*bias, x2, base.weight.t());
  return at::mm(x2, base.weight.t());
}

at::Tensor base_input_grad(const at::Tensor& g2, const BaseWeight& base, int64_t in_features) {
  if (base.is_nf4()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftx::nf4_matmul_t", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, int64_t, int64_t)>();
    return op.call(g2, base.weight, *base.absmax, *base.code, base.blocksize, in_features);
  }
  if (at::Tensor dx = dense_small_input_grad(g2, base.weight); dx.defined()) return dx;
  return at::mm(g2, base.weight);
}

at::Tensor adapter_as(const at::Tensor& t, at::ScalarType dt, int slot) {
  if (t.scalar_type() == dt || !t.is_cpu()) return t.to(dt);
  at::Tensor out = thread_scratch(slot, t.sizes(), t.options().dtype(dt));
  out.copy_(t);
  return out;
}

std::vector<int64_t> leading_shape_with(const at::Tensor& x, int64_t features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(features);
  return shape;
}

}  // namespace lora
}  // namespace peftx
