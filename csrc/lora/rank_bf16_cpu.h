// The LoRA ops' rank-r products for bf16 on the CPU (lora/cpu/rank_bf16.h's kernels: threads,
// layout and when they apply). lora_cpu.cpp calls these where rank_bf16_applies() and keeps its
// at::mm paths for the other dtypes and CPUs.
#pragma once

#include <ATen/ATen.h>

#include "lora/lora_math.h"

namespace peftx {
namespace lora {

// x2 is bf16 on a CPU with AVX-512 BF16 (and cpu_isa() allows AVX-512).
bool rank_bf16_applies(const at::Tensor& x2);

// u = xd lora_A^T [M, R] bf16, xd = x2 or dropout(x2) under d (may be null). lora_A [R, K] bf16.
at::Tensor rank_shrink_bf16(const at::Tensor& x2, const at::Tensor& lora_A, const Dropout* d);

// Whether rank_adjoint_bf16 takes this rank.
bool rank_adjoint_applies(int64_t rank);

// dA = gBs^T xd [R, K] in fp32, and dx += D^T(gBs lora_A) in place if dx is given (contiguous bf16
// [M, K]). gBs [M, R] bf16, lora_A [R, K] bf16.
at::Tensor rank_adjoint_bf16(const at::Tensor& x2, const at::Tensor& gBs, const at::Tensor& lora_A, const Dropout* d,
                             at::Tensor* dx);

}  // namespace lora
}  // namespace peftx
