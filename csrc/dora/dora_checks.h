// Argument checks of peftx::nf4_lora_row_norm and peftx::dense_lora_row_norm, shared by the CPU and
// CUDA registrations so both devices reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/checks.h"
#include "dora/dora_math.h"
#include "nf4/nf4_checks.h"

namespace peftx {
namespace dora {

constexpr const char* kRowNorm = "nf4_lora_row_norm";
constexpr const char* kDenseRowNorm = "dense_lora_row_norm";

// W [out, in] 4-bit (packed, absmax, code, blocksize), lora_A [r, in], lora_B [out, r] (float32,
// float16 or bfloat16; the norm is computed in fp32). Returns {A, B} as contiguous fp32.
inline std::pair<at::Tensor, at::Tensor> check_row_norm_args(const at::Tensor& packed, const at::Tensor& absmax,
                                                             const at::Tensor& code, int64_t blocksize,
                                                             const at::Tensor& lora_A, const at::Tensor& lora_B) {
  constexpr const char* op = kRowNorm;
  TORCH_CHECK(lora_A.dim() == 2, op, ": lora_A must be 2-D [r, in_features], got shape ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(1) == lora_A.size(0), op,
              ": lora_B must have shape [out_features, ", lora_A.size(0), "] (r of lora_A), got ", lora_B.sizes());
  PEFTX_CHECK_DTYPE_FLOAT(op, "lora_A", lora_A);
  PEFTX_CHECK_DTYPE_FLOAT(op, "lora_B", lora_B);
  const int64_t out = lora_B.size(0), in = lora_A.size(1);
  nf4::check_state(op, packed, absmax, code, blocksize, out * in);
  PEFTX_CHECK_SAME_DEVICE(op, "lora_A", lora_A, packed);
  PEFTX_CHECK_SAME_DEVICE(op, "lora_B", lora_B, packed);
  return {lora_A.to(at::kFloat).contiguous(), lora_B.to(at::kFloat).contiguous()};
}

// weight [out, in] float32, float16 or bfloat16, lora_A [r, in], lora_B [out, r] (float32, float16 or
// bfloat16). Returns {W contiguous, A, B as contiguous fp32}.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> check_dense_row_norm_args(const at::Tensor& weight,
                                                                                 const at::Tensor& lora_A,
                                                                                 const at::Tensor& lora_B) {
  constexpr const char* op = kDenseRowNorm;
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ", weight.sizes());
  PEFTX_CHECK_DTYPE_FLOAT(op, "weight", weight);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == weight.size(1), op, ": lora_A must have shape [r, ",
              weight.size(1), "] (in_features of weight), got ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == weight.size(0) && lora_B.size(1) == lora_A.size(0), op,
              ": lora_B must have shape [", weight.size(0), ", ", lora_A.size(0), "] (out_features, r), got ",
              lora_B.sizes());
  PEFTX_CHECK_DTYPE_FLOAT(op, "lora_A", lora_A);
  PEFTX_CHECK_DTYPE_FLOAT(op, "lora_B", lora_B);
  PEFTX_CHECK_SAME_DEVICE(op, "lora_A", lora_A, weight);
  PEFTX_CHECK_SAME_DEVICE(op, "lora_B", lora_B, weight);
  return {weight.contiguous(), lora_A.to(at::kFloat).contiguous(), lora_B.to(at::kFloat).contiguous()};
}

// The storage type of a weight check_dense_row_norm_args accepted.
inline DenseDt dense_dt(const at::Tensor& W) {
  return W.scalar_type() == at::kFloat ? DenseDt::kF32 : W.scalar_type() == at::kHalf ? DenseDt::kF16 : DenseDt::kBF16;
}

}  // namespace dora
}  // namespace peftx
