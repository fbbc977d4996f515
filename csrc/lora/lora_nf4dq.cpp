// lora_linear_nf4dq_fwd: lora_linear_fwd over an NF4 weight whose absmax is double-quantized (the
// default QLoRA storage). The fp32 absmax is decoded for each call and never kept: saved for
// backward are x, u and the weight's own tensors (lora_linear_fwd's autograd would save the decoded
// absmax, 1/32 of the packed weight, a new tensor every step), and backward decodes it again (one
// pass over the 8-bit codes). Forward and backward stay in C++ (autograd: lora_autograd.cpp's
// pattern; the derivation is in peftx/ops/lora.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <unordered_map>

#include "lora/lora_autograd.h"

namespace peftx {
namespace lora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using DqSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, int64_t, int64_t, const c10::optional<at::Tensor>&,
                                                 const at::Tensor&, const at::Tensor&, double, double, c10::SymInt);

bool plain(const at::Tensor& t) { return !t.key_set().has(c10::DispatchKey::Python); }

// The fp32 absmax for one op call. On the CPU with plain tensors it goes into a per-thread buffer
// per size, reused across layers and steps: a fresh 1 MiB tensor per call (a 4096 x 4096 layer) costs
// more in page faults than the decode (about 0.2 vs 0.03 ms). Elsewhere (other devices; fake or
// functional tensors while torch.compile traces) the functional op.
at::Tensor decoded_absmax(const at::Tensor& q, const at::Tensor& nested, const at::Tensor& nested_code,
                          const at::Tensor& offset, int64_t nested_blocksize) {
  static auto functional = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("peftx::nf4_double_dequantize", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, int64_t)>();
  static auto into = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftx::nf4_double_dequantize_into", "")
                         .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     int64_t, const at::Tensor&)>();
  const bool scratch = q.is_cpu() && plain(q) && plain(nested) && plain(nested_code) && plain(offset);
  if (!scratch) return functional.call(q, nested, nested_code, offset, nested_blocksize);
  thread_local std::unordered_map<int64_t, at::Tensor> buffers;
  at::Tensor& out = buffers[q.numel()];
  if (!out.defined()) out = at::empty({q.numel()}, q.options().dtype(at::kFloat));
  into.call(q, nested, nested_code, offset, nested_blocksize, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> nf4dq_fwd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& qabsmax,
                                             const at::Tensor& nested_absmax, const at::Tensor& nested_code,
                                             const at::Tensor& offset, const at::Tensor& code, int64_t blocksize,
                                             int64_t nested_blocksize, const c10::optional<at::Tensor>& bias,
                                             const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                             double dropout_p, c10::SymInt seed) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("peftx::lora_linear_fwd", "").typed<LoraFwdSig>();
  const at::Tensor absmax = decoded_absmax(qabsmax, nested_absmax, nested_code, offset, nested_blocksize);
  return op.call(x, packed, absmax, code, blocksize, bias, lora_A, lora_B, scaling, dropout_p, std::move(seed));
}

// The forward's arguments in order; the autograd edges exist for the tensor ones that are present.
enum Arg { kX, kPacked, kQ, kNested, kNestedCode, kOffset, kCode, kBlocksize, kNestedBlocksize, kBias, kA, kB,
           kScaling, kDropout, kSeed, kArgs };

struct LoraLinearNF4DQFunction : public torch::autograd::Function<LoraLinearNF4DQFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                               const at::Tensor& nested_code, const at::Tensor& offset, const at::Tensor& code,
                               int64_t blocksize, int64_t nested_blocksize, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                               c10::SymInt seed) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("peftx::lora_linear_nf4dq_fwd", "").typed<DqSig>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, u] = op.call(x, packed, qabsmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize,
                          bias, lora_A, lora_B, scaling, dropout_p, seed);
    ctx->mark_non_differentiable({u});
    ctx->save_for_backward({x, u, packed, qabsmax, nested_absmax, nested_code, offset, code, lora_A, lora_B});
    save_bwd_scalars(ctx, blocksize, scaling, dropout_p, seed);
    ctx->saved_data["nested_blocksize"] = nested_blocksize;
    // Edge index of each argument (kX .. kSeed): needs_input_grad takes these.
    ctx->saved_data["edge"] = edge_indices({true, true, true, true, true, true, true, false, false, present(bias), true,
                                            true, false, false, false});
    return {y, u};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(kArgs);
    const at::Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return out;
    const std::vector<int64_t> edge = ctx->saved_data["edge"].toIntVector();
    auto need = [&](Arg a) { return needs_grad(ctx, edge[a]); };
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor absmax = decoded_absmax(s[3], s[4], s[5], s[6], ctx->saved_data["nested_blocksize"].toInt());
    const at::Tensor g = grad_y.contiguous();
    auto [dx, dA, dB] = call_lora_bwd(ctx, g, s[0], s[1], s[2], absmax, s[7], s[8], s[9], need(kX));
    if (need(kX)) out[kX] = dx;
    if (need(kA)) out[kA] = dA;
    if (need(kB)) out[kB] = dB;
    if (need(kBias)) out[kBias] = g.reshape({-1, g.size(-1)}).sum(0);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> nf4dq_fwd_autograd(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
    const at::Tensor& nested_code, const at::Tensor& offset, const at::Tensor& code, int64_t blocksize,
    int64_t nested_blocksize, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, double dropout_p, c10::SymInt seed) {
  variable_list yu = LoraLinearNF4DQFunction::apply(x, packed, qabsmax, nested_absmax, nested_code, offset, code,
                                                    blocksize, nested_blocksize, bias, lora_A, lora_B, scaling,
                                                    dropout_p, std::move(seed));
  return {yu[0], yu[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CompositeExplicitAutograd, m) {
  m.impl("lora_linear_nf4dq_fwd", &nf4dq_fwd);
}

TORCH_LIBRARY_IMPL(peftx, Autograd, m) {
  m.impl("lora_linear_nf4dq_fwd", &nf4dq_fwd_autograd);
}

}  // namespace lora
}  // namespace peftx
