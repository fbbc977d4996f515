// Shared pieces of the C++ autograd of the LoRA forwards (lora_autograd.cpp: lora_linear_fwd;
// lora_nf4dq.cpp: lora_linear_nf4dq_fwd): the typed signatures of the ops they call, and the map
// from an op argument to its autograd edge (only tensor arguments that are present have one).
#pragma once

#include <ATen/ATen.h>
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

}  // namespace lora
}  // namespace peftx
