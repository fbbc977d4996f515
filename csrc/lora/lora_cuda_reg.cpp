// CUDA registration of the LoRA ops: argument checks, the current stream, cuBLAS products through
// at::mm and the element-wise kernels of lora_cuda.cu. Unlike the CPU kernels, the dropout passes
// materialise D(x) as a transient (freed before the op returns, never saved for backward).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_reg.h"
#include "lora/lora_base.h"
#include "lora/lora_cuda.h"

namespace peftx {
namespace lora {
namespace {

at::Tensor dropout_of(const at::Tensor& x2, const Dropout& d) {
  at::Tensor xd = at::empty_like(x2);
  C10_CUDA_CHECK(launch_lora_dropout(kind_of(x2.scalar_type(), "peftx lora"), x2.const_data_ptr(), x2.numel(), d,
                                     xd.data_ptr(), current_stream()));
  return xd;
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& absmax,
    const c10::optional<at::Tensor>& code, int64_t blocksize, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A_in, const at::Tensor& lora_B_in, double scaling, double dropout_p, int64_t seed) {
  const BaseWeight base{weight, absmax, code, blocksize};
  const at::Tensor x2 = check_lora_args("lora_linear_fwd", x, base, bias, lora_A_in, lora_B_in, dropout_p);
  const at::Tensor lora_A = lora_A_in.to(x2.scalar_type()), lora_B = lora_B_in.to(x2.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = lora_B.size(0);
  at::Tensor y = base_forward(x2, base, N, bias);
  const at::Tensor u = dropout_p == 0.0
                           ? at::mm(x2, lora_A.t())
                           : at::mm(dropout_of(x2, make_dropout(static_cast<uint64_t>(seed), dropout_p)),
                                    lora_A.t());
  if (x2.size(0) > 0) y.addmm_(u, lora_B.t(), 1.0, scaling);
  return {y.view(leading_shape_with(x, N)), u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u, const at::Tensor& weight,
    const c10::optional<at::Tensor>& absmax, const c10::optional<at::Tensor>& code, int64_t blocksize,
    const at::Tensor& lora_A_in, const at::Tensor& lora_B_in, double scaling, double dropout_p, int64_t seed,
    bool need_dx) {
  constexpr const char* op = "lora_linear_bwd";
  const BaseWeight base{weight, absmax, code, blocksize};
  const c10::cuda::CUDAGuard guard(x.device());
  BwdParts p = lora_bwd_common(op, grad, x, u, base, lora_A_in, lora_B_in, scaling, dropout_p, need_dx, false);
  at::Tensor dA;
  if (dropout_p == 0.0 || p.M == 0) {
    dA = lora_bwd_no_dropout(p, need_dx);
  } else {
    const Dropout d = make_dropout(static_cast<uint64_t>(seed), dropout_p);
    dA = at::mm(p.gBs.t(), dropout_of(p.x2, d));
    if (need_dx) {
      const at::Tensor t = at::mm(p.gBs, p.lora_A);
      C10_CUDA_CHECK(launch_lora_dropout_axpy(kind_of(p.x2.scalar_type(), "peftx lora"), t.const_data_ptr(), t.numel(),
                                              d, p.dx.data_ptr(), current_stream()));
    }
  }
  return {need_dx ? p.dx.view(x.sizes()) : p.dx, dA.to(lora_A_in.scalar_type()), p.dB.to(lora_B_in.scalar_type())};
}

at::Tensor lora_multi_fwd_cuda(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, const at::Tensor& scalings,
                               const at::Tensor& adapter_ids) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // forward-only op: see lora_multi_cpu.cpp
  const at::Tensor x2 = check_multi_args("lora_multi_fwd", x, base_out, lora_A, lora_B, scalings, adapter_ids);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x2.size(0), K = x2.size(1), R = lora_A.size(1), N = lora_B.size(1);
  at::Tensor y = base_out.reshape({M, N}).clone(at::MemoryFormat::Contiguous);
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous(), s = scalings.contiguous(),
                   ids = adapter_ids.contiguous();
  at::Tensor u = at::empty({M, R}, x2.options().dtype(at::kFloat));
  const FloatKind kind = kind_of(x2.scalar_type(), "peftx lora");
  C10_CUDA_CHECK(launch_lora_multi_shrink(kind, x2.const_data_ptr(), M, K, A.const_data_ptr(), R,
                                          ids.const_data_ptr<int64_t>(), u.data_ptr<float>(), current_stream()));
  C10_CUDA_CHECK(launch_lora_multi_expand(kind, u.const_data_ptr<float>(), M, R, B.const_data_ptr(), N,
                                          s.const_data_ptr<float>(), ids.const_data_ptr<int64_t>(), y.data_ptr(),
                                          current_stream()));
  return y.view(base_out.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CUDA, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cuda);
  m.impl("lora_multi_fwd", &lora_multi_fwd_cuda);
}

}  // namespace lora
}  // namespace peftx
