// CUDA registrations of peftx::nf4_lora_row_norm and peftx::dense_lora_row_norm: argument checks,
// the current stream, the launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_reg.h"
#include "dora/dora_checks.h"
#include "dora/dora_cuda.h"

namespace peftx {
namespace dora {
namespace {

at::Tensor nf4_lora_row_norm_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                  int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                  double scale) {
  const c10::cuda::CUDAGuard guard(packed.device());
  auto [A, B] = check_row_norm_args(packed, absmax, code, blocksize, lora_A, lora_B);
  const int64_t rows = B.size(0), cols = A.size(1), r = A.size(0);
  const at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  at::Tensor norm = at::empty({rows}, packed.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_nf4_lora_row_norm(pk.const_data_ptr<uint8_t>(), am.const_data_ptr<float>(),
                                          cd.const_data_ptr<float>(), blocksize, rows, cols,
                                          A.const_data_ptr<float>(), B.const_data_ptr<float>(), r,
                                          static_cast<float>(scale), norm.data_ptr<float>(), current_stream()));
  return norm;
}

at::Tensor dense_lora_row_norm_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                    double scale) {
  const c10::cuda::CUDAGuard guard(weight.device());
  auto [W, A, B] = check_dense_row_norm_args(weight, lora_A, lora_B);
  const int64_t rows = W.size(0), cols = W.size(1), r = A.size(0);
  const DenseDt dt = dense_dt(W);
  at::Tensor norm = at::empty({rows}, W.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_dense_lora_row_norm(W.const_data_ptr(), dt, rows, cols, A.const_data_ptr<float>(),
                                            B.const_data_ptr<float>(), r, static_cast<float>(scale),
                                            norm.data_ptr<float>(), current_stream()));
  return norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CUDA, m) {
  m.impl("nf4_lora_row_norm", &nf4_lora_row_norm_cuda);
  m.impl("dense_lora_row_norm", &dense_lora_row_norm_cuda);
}

}  // namespace dora
}  // namespace peftx
