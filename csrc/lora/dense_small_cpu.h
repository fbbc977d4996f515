// The LoRA ops' frozen dense base product for few tokens on the CPU (lora/cpu/dense_small.h's
// kernels: threads, layout and the checks of when they apply). lora_base.cpp's base_forward /
// base_input_grad call these first and fall back to at::mm where they return an undefined tensor.
#pragma once

#include <ATen/ATen.h>

namespace peftx {
namespace lora {

// Most tokens the kernels take: crossovers with the CPU BLAS measured on 4096 x 4096, 2 cores
// (fp32 x W^T at 16 tokens 3.4 vs 6.2 ms, even at 24; bf16 x W^T at 4 tokens 0.78 vs 0.82 ms, behind
// from 8; g W at 16 tokens fp32 3.1 vs 7.8 ms, bf16 2.0 vs 2.6 ms, behind at 24).
constexpr int64_t kDenseSmallMaxTokens = 16;
constexpr int64_t kDenseSmallMaxTokensBf16Forward = 4;

// x2 [M, K] W^T (+ bias) in x2's dtype, or undefined where the kernels do not apply (not CPU, not
// AVX-512 (+ BF16 for bf16), another dtype, K % 32 != 0, too many tokens).
at::Tensor dense_small_forward(const at::Tensor& x2, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// g2 [M, N] W [N, K] in g2's dtype, or undefined where the kernels do not apply (as above, with
// K % 64 == 0 for fp32 and K % 128 == 0 for bf16).
at::Tensor dense_small_input_grad(const at::Tensor& g2, const at::Tensor& weight);

}  // namespace lora
}  // namespace peftx
