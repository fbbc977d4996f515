// Autograd of lora_linear_fwd in C++: the layers' forward and backward never enter Python for the
// op's gradient bookkeeping (torch.library's Python autograd cost ~50 us per step, as much as the
// whole op at a few tokens). Saved for backward: x, u = D(x) A^T, the base weight's tensors and the
// adapters (all already held elsewhere: no copies); the mask is regenerated from the seed.
//
// Gradients (g = grad of y, rows of x2 = x flattened to [M, in]; lora_linear_bwd derives the rest):
//   dx = g W + s D^T(g B A) (lora_linear_bwd, base path included), dA, dB (lora_linear_bwd),
//   dW = g^T x2 (a dense base that requires grad), dbias = sum of g's rows.
#include "lora/lora_autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace peftx {
namespace lora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// The forward's arguments in order; the autograd edges exist for the tensor ones that are present.
enum Arg { kX, kWeight, kAbsmax, kCode, kBlocksize, kBias, kA, kB, kScaling, kDropout, kSeed, kArgs };

struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& absmax, const c10::optional<at::Tensor>& code,
                               int64_t blocksize, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, double scaling, double dropout_p, c10::SymInt seed) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("peftx::lora_linear_fwd", "").typed<LoraFwdSig>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, u] = op.call(x, weight, absmax, code, blocksize, bias, lora_A, lora_B, scaling, dropout_p, seed);
    ctx->mark_non_differentiable({u});
    ctx->save_for_backward({x, u, weight, absmax.value_or(at::Tensor()), code.value_or(at::Tensor()), lora_A,
                            lora_B});
    save_bwd_scalars(ctx, blocksize, scaling, dropout_p, seed);
    // Edge index of each argument (kX .. kSeed): needs_input_grad takes these.
    ctx->saved_data["edge"] = edge_indices(
        {true, true, present(absmax), present(code), false, present(bias), true, true, false, false, false});
    return {y, u};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(kArgs);
    const at::Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return out;
    const std::vector<int64_t> edge = ctx->saved_data["edge"].toIntVector();
    auto need = [&](Arg a) { return needs_grad(ctx, edge[a]); };
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &u = saved[1], &weight = saved[2], &lora_A = saved[5], &lora_B = saved[6];
    const c10::optional<at::Tensor> absmax = optional_of(saved[3]), code = optional_of(saved[4]);
    const at::Tensor g = grad_y.contiguous();
    auto [dx, dA, dB] = call_lora_bwd(ctx, g, x, u, weight, absmax, code, lora_A, lora_B, need(kX));
    if (need(kX)) out[kX] = dx;
    if (need(kA)) out[kA] = dA;
    if (need(kB)) out[kB] = dB;
    const at::Tensor g2 = g.reshape({-1, g.size(-1)});
    if (need(kWeight) && !absmax.has_value()) out[kWeight] = g2.t().mm(x.reshape({-1, x.size(-1)}));
    if (need(kBias)) out[kBias] = g2.sum(0);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_autograd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& absmax,
    const c10::optional<at::Tensor>& code, int64_t blocksize, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p, c10::SymInt seed) {
  variable_list yu = LoraLinearFunction::apply(x, weight, absmax, code, blocksize, bias, lora_A, lora_B, scaling,
                                               dropout_p, std::move(seed));
  return {yu[0], yu[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, Autograd, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_autograd);
}

}  // namespace lora
}  // namespace peftx
