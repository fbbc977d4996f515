// The LoRA ops' rank-r products for bf16 on the CPU (lora/cpu/rank_bf16.h's kernels: threads,
// layout and when they apply). lora_cpu.cpp and lora_base.cpp call these where rank_bf16_applies()
// (and, for all but the shrink, rank_bf16_takes(r)) and keep their at::mm paths otherwise.
#pragma once

#include <ATen/ATen.h>

#include "lora/lora_math.h"

namespace peftx {
namespace lora {

// x2 is bf16 on a CPU with AVX-512 BF16 (and cpu_isa() allows AVX-512).
bool rank_bf16_applies(const at::Tensor& x2);
// Whether the expand and backward kernels take this rank.
bool rank_bf16_takes(int64_t rank);

// u = xd A^T [M, R] bf16, xd = x2 or dropout(x2) under d (may be null). A [R, K] bf16.
at::Tensor rank_shrink_bf16(const at::Tensor& x2, const at::Tensor& A, const Dropout* d);

// The two together, u = xd A^T and y2 += s u B^T in place (R <= kMaxRank; y2 [M, N] contiguous
// bf16, B [N, R] bf16), in one parallel region. Returns u.
at::Tensor rank_shrink_expand_bf16(const at::Tensor& x2, const at::Tensor& A, const Dropout* d, at::Tensor* y2,
                                   const at::Tensor* B, double s);

// dA = gBs^T xd [R, K] in fp32, and dx += D^T(gBs A) in place if dx is given (contiguous bf16
// [M, K]). gBs [M, R] bf16, A [R, K] bf16.
at::Tensor rank_adjoint_bf16(const at::Tensor& x2, const at::Tensor& gBs, const at::Tensor& A, const Dropout* d,
                             at::Tensor* dx);

// One pass over g [M, N] for both products over it: gBs = bf16(bf16(g B) s) [M, R] bf16 (the
// rounding of at::mm then mul_) and dB = g^T bf16(u s) [N, R] fp32 (u [M, R] bf16, scaled as
// u.mul(s) rounds). B [N, R] bf16.
std::pair<at::Tensor, at::Tensor> rank_gbs_gt_u_bf16(const at::Tensor& g2, const at::Tensor& B, const at::Tensor& u,
                                                     double s);

}  // namespace lora
}  // namespace peftx
