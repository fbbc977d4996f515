// The frozen base product under a LoRA layer and the argument checks of the LoRA ops, shared by the
// CPU and CUDA registrations (device-generic: at:: calls and the peftx::nf4_* ops through the
// dispatcher, so each device runs its own kernels).
#pragma once

#include <ATen/ATen.h>

#include "common/thread_scratch.h"

namespace peftx {
namespace lora {

// The base weight of a LoRA layer: dense [out, in] (absmax undefined) or NF4 (weight = packed
// uint8 bytes, absmax fp32 per block, code [16]).
struct BaseWeight {
  const at::Tensor& weight;
  const c10::optional<at::Tensor>& absmax;
  const c10::optional<at::Tensor>& code;
  int64_t blocksize;
  bool is_nf4() const { return absmax.has_value(); }
};

// Checks x [..., in], A [r, in], B [out, r], the base weight against them and the dropout
// probability (float64 x only where allow_double); returns x as a contiguous [tokens, in] tensor.
at::Tensor check_lora_args(const char* op, const at::Tensor& x, const BaseWeight& base,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, double dropout_p, bool allow_double = false);

// Checks the backward's grad [..., N] and u [M, R] against x [..., K] (M rows); returns grad as a
// contiguous [M, N] tensor.
at::Tensor check_bwd_args(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u,
                          int64_t M, int64_t R, int64_t N);

// Checks the mixed-adapter arguments: x [..., K], base_out [..., N], lora_A [n, R, K],
// lora_B [n, N, R], scalings fp32 [n], adapter_ids int64 [tokens] in [-1, n). Returns x as a
// contiguous [tokens, K] tensor.
at::Tensor check_multi_args(const char* op, const at::Tensor& x, const at::Tensor& base_out,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scalings,
                            const at::Tensor& adapter_ids);

// y = x2 W^T + bias  ([tokens, out], x2's dtype).
at::Tensor base_forward(const at::Tensor& x2, const BaseWeight& base, int64_t out_features,
                        const c10::optional<at::Tensor>& bias);

// dx = g2 W  ([tokens, in], g2's dtype): the input gradient of the frozen base product.
at::Tensor base_input_grad(const at::Tensor& g2, const BaseWeight& base, int64_t in_features);

// The part of lora_linear_bwd every device shares (checks, gBs = s g B, dB, the base's dx) and,
// without dropout, dA and dx += gBs A. Derivation: y = x W^T + s (D(x) A^T) B^T, u = D(x) A^T, so
// with gBs = s g B:  dB = g^T (s u),  dA = gBs^T D(x),  dx = g W + D^T(gBs A)  (D: the dropout,
// x * mask / (1 - p), whose transpose is the same elementwise scaling).
struct BwdParts {
  at::Tensor x2, lora_A, lora_B, g2, gBs, dB, dx;  // x2 [M, K]; lora_A/B in x's dtype; dx [M, K] or empty
  int64_t M, K, R, N;
};
BwdParts lora_bwd_common(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u,
                         const BaseWeight& base, const at::Tensor& lora_A_in, const at::Tensor& lora_B_in,
                         double scaling, double dropout_p, bool need_dx, bool allow_double);
// dA = gBs^T x and dx += gBs A (the dropout-free case, or M == 0).
at::Tensor lora_bwd_no_dropout(BwdParts& p, bool need_dx);

// An adapter weight in dtype dt for one op call: t itself where it already has dt (or is not on the
// CPU: t.to(dt)), else a copy (torch's own conversion) in this thread's scratch slot (0 or 1), which
// the next call on the thread overwrites. The copies of fp32 adapters for a bf16 step then reuse the
// same memory instead of a fresh 128 KiB tensor each, whose allocations between the step's 4 MiB
// ones fragmented glibc's heap so that y and dx came from fresh (page-faulting) memory each step.
at::Tensor adapter_as(const at::Tensor& t, at::ScalarType dt, int slot);

// The thread_scratch slots (common/thread_scratch.h) of the chunked CPU passes, on each worker
// (adapter_as uses slots 0 and 1).
constexpr int kChunkSlot = 2, kChunkSlot2 = 3;

// Shape of the output for x [..., in] and `features` output columns.
std::vector<int64_t> leading_shape_with(const at::Tensor& x, int64_t features);

}  // namespace lora
}  // namespace peftx
