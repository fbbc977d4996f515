// The LoRA ops' rank-r products for fp32 on the CPU (lora/cpu/rank_f32.h's kernels: threads,
// layout and when they apply), as rank_bf16_cpu.h for bf16. lora_cpu.cpp and lora_base.cpp call
// these where rank_f32_applies(x2, r) and keep their at::mm paths otherwise.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "lora/lora_math.h"

namespace peftx {
namespace lora {

// x2 is fp32 on a CPU where cpu_isa() allows AVX-512, and the rank is one the kernels take.
bool rank_f32_applies(const at::Tensor& x2, int64_t rank);

// u = xd A^T [M, R] and y2 += s u B^T in place (y2 [M, N] contiguous, B [N, R]; both fp32), xd =
// x2 or dropout(x2) under d (may be null), in one parallel region. Returns u.
at::Tensor rank_shrink_expand_f32(const at::Tensor& x2, const at::Tensor& A, const Dropout* d, at::Tensor& y2,
                                  const at::Tensor& B, double s);

// dA = gBs^T xd [R, K], and dx += D^T(gBs A) in place if dx is given (contiguous [M, K]).
// gBs [M, R], A [R, K].
at::Tensor rank_adjoint_f32(const at::Tensor& x2, const at::Tensor& gBs, const at::Tensor& A, const Dropout* d,
                            at::Tensor* dx);

// One pass over g [M, N] for both products over it: gBs = fp32(g B) s [M, R] (at::mm then mul_)
// and dB = g^T fp32(u s) [N, R]. B [N, R], u [M, R].
std::pair<at::Tensor, at::Tensor> rank_gbs_gt_u_f32(const at::Tensor& g2, const at::Tensor& B, const at::Tensor& u,
                                                    double s);

}  // namespace lora
}  // namespace peftx
