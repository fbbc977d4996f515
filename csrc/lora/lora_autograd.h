// Shared pieces of the C++ autograd of the LoRA forwards (lora_autograd.cpp: lora_linear_fwd;
// lora_nf4dq.cpp: lora_linear_nf4dq_fwd): the typed signatures of the ops they call, the map from an
// op argument to its autograd edge (only tensor arguments that are present have one), and the
// lora_linear_bwd call both backwards make.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <initializer_list>
#include <vector>

namespace peftx {
namespace lora {

using LoraFwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t,
    const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double, double, c10::SymInt);
using LoraBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, int64_t, const at::Tensor&, const at::Tensor&, double, double, c10::SymInt,
    bool);

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// edge[i] = the autograd edge of argument i, or -1 where argument i is no tensor or an absent one
// (`tensor` lists, per argument in order, whether it is a present tensor).
inline std::vector<int64_t> edge_indices(std::initializer_list<bool> tensor) {
  std::vector<int64_t> edge;
  int64_t e = 0;
  for (bool t : tensor) edge.push_back(t ? e++ : -1);
  return edge;
}

// Whether the argument with this edge index (-1: none) needs a gradient.
inline bool needs_grad(const torch::autograd::AutogradContext* ctx, int64_t edge) {
  return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
}

// The forward's non-tensor arguments that lora_linear_bwd takes, kept in the context.
inline void save_bwd_scalars(torch::autograd::AutogradContext* ctx, int64_t blocksize, double scaling,
                             double dropout_p, const c10::SymInt& seed) {
  ctx->saved_data["blocksize"] = blocksize;
  ctx->saved_data["scaling"] = scaling;
  ctx->saved_data["dropout_p"] = dropout_p;
  ctx->saved_data["seed"] = seed;
}

// (dx, dA, dB) of lora_linear_bwd for grad g (contiguous), with the scalars save_bwd_scalars kept.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> call_lora_bwd(
    torch::autograd::AutogradContext* ctx, const at::Tensor& g, const at::Tensor& x, const at::Tensor& u,
    const at::Tensor& weight, const c10::optional<at::Tensor>& absmax, const c10::optional<at::Tensor>& code,
    const at::Tensor& lora_A, const at::Tensor& lora_B, bool need_dx) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("peftx::lora_linear_bwd", "").typed<LoraBwdSig>();
  return op.call(g, x, u, weight, absmax, code, ctx->saved_data["blocksize"].toInt(), lora_A, lora_B,
                 ctx->saved_data["scaling"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
                 ctx->saved_data["seed"].toSymInt(), need_dx);
}

}  // namespace lora
}  // namespace peftx
