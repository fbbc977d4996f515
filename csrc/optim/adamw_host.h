// Host-side preparation shared by the CPU kernels, the CUDA registration and the CPU emulation of
// the CUDA grid: argument checks (messages name the op, the argument and the list index), the fp32
// scalars of a step, the per-tensor structs of adamw_math.h, and the work list of a launch.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/checks.h"
#include "optim/adamw_math.h"

namespace peftx {
namespace optim {

struct HyperArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize;
  bool increment_steps;  // count this update in steps (once per distinct tensor) before reading them
};

inline void check_hyper(const char* op, const HyperArgs& a) {
  TORCH_CHECK(std::isfinite(a.lr) && a.lr >= 0.0, op, ": lr must be a finite number >= 0, got ", a.lr);
  TORCH_CHECK(std::isfinite(a.eps) && a.eps >= 0.0, op, ": eps must be a finite number >= 0, got ", a.eps);
  TORCH_CHECK(a.beta1 >= 0.0 && a.beta1 < 1.0, op, ": beta1 must be in [0, 1), got ", a.beta1);
  TORCH_CHECK(a.beta2 >= 0.0 && a.beta2 < 1.0, op, ": beta2 must be in [0, 1), got ", a.beta2);
  TORCH_CHECK(std::isfinite(a.weight_decay) && a.weight_decay >= 0.0, op,
              ": weight_decay must be a finite number >= 0, got ", a.weight_decay);
}

// Python floats are doubles: every scalar is formed in double and rounded once to fp32, as
// torch.optim.AdamW's single-tensor path does.
inline AdamWHyper make_hyper(const HyperArgs& a) {
  return AdamWHyper{static_cast<float>(1.0 - a.lr * a.weight_decay), static_cast<float>(1.0 - a.beta1),
                    static_cast<float>(a.beta2), static_cast<float>(1.0 - a.beta2), static_cast<float>(a.eps),
                    a.maximize ? -1.0f : 1.0f};
}

// The step count t of this update (the caller has already counted it) -> -lr / (1 - beta1^t) and
// sqrt(1 - beta2^t).
inline void bias_terms(const HyperArgs& a, double t, float& neg_step_size, float& bc2_sqrt) {
  neg_step_size = static_cast<float>(-(a.lr / (1.0 - std::pow(a.beta1, t))));
  bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(a.beta2, t)));
}

// Adds 1 to each distinct step tensor (a list may name one tensor several times: slices of one
// parameter). The optimizers' CPU fp32 scalars are bumped in place without a dispatch each.
inline void increment_steps(at::TensorList steps) {
  std::vector<const void*> seen;
  for (const at::Tensor& s : steps) {
    const void* key = s.const_data_ptr();
    if (std::find(seen.begin(), seen.end(), key) != seen.end()) continue;
    seen.push_back(key);
    if (s.is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1)
      *static_cast<float*>(const_cast<void*>(key)) += 1.0f;
    else
      at::Tensor(s).add_(1);
  }
}

inline double read_step(const char* op, size_t i, const at::Tensor& step) {
  // The optimizers keep steps as CPU fp32 scalars (torch's convention): read those directly.
  const double t = step.is_cpu() && step.scalar_type() == at::kFloat ? static_cast<double>(*step.const_data_ptr<float>())
                                                                     : step.item<double>();
  TORCH_CHECK(std::isfinite(t) && t >= 1.0, op, ": steps[", i,
              "] must be the step count of this update (>= 1), got ", t);
  return t;
}

// Mutable arguments that are not contiguous are updated through a contiguous copy that finish()
// writes back; read-only ones are made contiguous and kept alive here.
class ContiguousArgs {
 public:
  at::Tensor mut(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    at::Tensor c = t.contiguous();
    pending_.emplace_back(t, c);
    return c;
  }
  at::Tensor in(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    keep_.push_back(t.contiguous());
    return keep_.back();
  }
  void finish() {
    for (auto& [orig, copy] : pending_) orig.copy_(copy);
    pending_.clear();
  }

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> pending_;
  std::vector<at::Tensor> keep_;
};

inline void check_list_sizes(const char* op, size_t n, std::initializer_list<std::pair<const char*, size_t>> lists) {
  for (const auto& [name, size] : lists)
    TORCH_CHECK(size == n, op, ": ", name, " must have one tensor per parameter (", n, "), got ", size);
}

inline void check_step(const char* op, size_t i, const at::Tensor& step) {
  TORCH_CHECK(step.numel() == 1, op, ": steps[", i, "] must hold one number, got shape ", step.sizes());
}

inline void check_param(const char* op, size_t i, const at::Tensor& p, const at::Tensor& g, const at::Device& dev) {
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16,
              op, ": params[", i, "] must be float32, float16 or bfloat16, got ", p.scalar_type());
  TORCH_CHECK(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] must have the dtype of params[", i, "] (",
              p.scalar_type(), "), got ", g.scalar_type());
  TORCH_CHECK(g.sizes() == p.sizes(), op, ": grads[", i, "] must have the shape of params[", i, "] ", p.sizes(),
              ", got ", g.sizes());
  TORCH_CHECK(p.device() == dev && g.device() == dev, op, ": params[", i, "] and grads[", i, "] must be on ", dev,
              ", got ", p.device(), " and ", g.device());
}

inline void check_state(const char* op, const char* name, size_t i, const at::Tensor& s, at::ScalarType dtype,
                        int64_t numel, const at::Device& dev) {
  TORCH_CHECK(s.scalar_type() == dtype, op, ": ", name, "[", i, "] must be ", dtype, ", got ", s.scalar_type());
  TORCH_CHECK(s.numel() == numel, op, ": ", name, "[", i, "] must have ", numel, " elements, got ", s.numel(),
              " (shape ", s.sizes(), ")");
  TORCH_CHECK(s.device() == dev, op, ": ", name, "[", i, "] must be on ", dev, ", got ", s.device());
}

// The tensors of one call, as the kernels see them, grouped by parameter dtype (one launch each).
template <typename Tensor>
struct Prepared {
  std::vector<at::ScalarType> dtypes;                // distinct parameter dtypes, in order of appearance
  std::vector<std::vector<Tensor>> groups;           // groups[k]: tensors of dtype dtypes[k]
  ContiguousArgs args;
};

inline size_t group_index(std::vector<at::ScalarType>& dtypes, at::ScalarType t) {
  for (size_t k = 0; k < dtypes.size(); ++k)
    if (dtypes[k] == t) return k;
  dtypes.push_back(t);
  return dtypes.size() - 1;
}

inline void prepare_adamw(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList steps, const HyperArgs& a,
                          Prepared<AdamWTensor>& out) {
  check_hyper(op, a);
  const size_t n = params.size();
  check_list_sizes(op, n, {{"grads", grads.size()}, {"exp_avgs", exp_avgs.size()},
                           {"exp_avg_sqs", exp_avg_sqs.size()}, {"steps", steps.size()}});
  if (n == 0) return;
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    check_param(op, i, params[i], grads[i], dev);
    check_state(op, "exp_avgs", i, exp_avgs[i], at::kFloat, params[i].numel(), dev);
    check_state(op, "exp_avg_sqs", i, exp_avg_sqs[i], at::kFloat, params[i].numel(), dev);
    check_step(op, i, steps[i]);
  }
  if (a.increment_steps) increment_steps(steps);
  for (size_t i = 0; i < n; ++i) {
    AdamWTensor t{};
    bias_terms(a, read_step(op, i, steps[i]), t.neg_step_size, t.bc2_sqrt);
    t.n = params[i].numel();
    if (t.n == 0) continue;
    t.param = out.args.mut(params[i]).data_ptr();
    t.grad = out.args.in(grads[i]).const_data_ptr();
    t.exp_avg = out.args.mut(exp_avgs[i]).data_ptr<float>();
    t.exp_avg_sq = out.args.mut(exp_avg_sqs[i]).data_ptr<float>();
    const size_t k = group_index(out.dtypes, params[i].scalar_type());
    if (out.groups.size() <= k) out.groups.resize(k + 1);
    out.groups[k].push_back(t);
  }
}

inline void prepare_adamw8(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                           at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                           at::TensorList exp_avg_sq_absmax, at::TensorList steps, const HyperArgs& a,
                           Prepared<AdamW8Tensor>& out) {
  check_hyper(op, a);
  const size_t n = params.size();
  check_list_sizes(op, n, {{"grads", grads.size()}, {"exp_avg_codes", exp_avg_codes.size()},
                           {"exp_avg_absmax", exp_avg_absmax.size()}, {"exp_avg_sq_codes", exp_avg_sq_codes.size()},
                           {"exp_avg_sq_absmax", exp_avg_sq_absmax.size()}, {"steps", steps.size()}});
  if (n == 0) return;
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_param(op, i, params[i], grads[i], dev);
    check_state(op, "exp_avg_codes", i, exp_avg_codes[i], at::kByte, numel, dev);
    check_state(op, "exp_avg_sq_codes", i, exp_avg_sq_codes[i], at::kByte, numel, dev);
    check_state(op, "exp_avg_absmax", i, exp_avg_absmax[i], at::kFloat, quant_blocks(numel), dev);
    check_state(op, "exp_avg_sq_absmax", i, exp_avg_sq_absmax[i], at::kFloat, quant_blocks(numel), dev);
    check_step(op, i, steps[i]);
  }
  if (a.increment_steps) increment_steps(steps);
  for (size_t i = 0; i < n; ++i) {
    AdamW8Tensor t{};
    bias_terms(a, read_step(op, i, steps[i]), t.neg_step_size, t.bc2_sqrt);
    t.n = params[i].numel();
    if (t.n == 0) continue;
    t.param = out.args.mut(params[i]).data_ptr();
    t.grad = out.args.in(grads[i]).const_data_ptr();
    t.exp_avg_q = out.args.mut(exp_avg_codes[i]).data_ptr<uint8_t>();
    t.exp_avg_absmax = out.args.mut(exp_avg_absmax[i]).data_ptr<float>();
    t.exp_avg_sq_q = out.args.mut(exp_avg_sq_codes[i]).data_ptr<uint8_t>();
    t.exp_avg_sq_absmax = out.args.mut(exp_avg_sq_absmax[i]).data_ptr<float>();
    const size_t k = group_index(out.dtypes, params[i].scalar_type());
    if (out.groups.size() <= k) out.groups.resize(k + 1);
    out.groups[k].push_back(t);
  }
}

// Work items covering every tensor in `per_item`-element pieces, tensor by tensor.
template <typename Tensor>
std::vector<WorkItem> work_items(const std::vector<Tensor>& tensors, int64_t per_item) {
  std::vector<WorkItem> items;
  for (size_t k = 0; k < tensors.size(); ++k)
    for (int64_t b = 0; b < tensors[k].n; b += per_item) items.push_back(WorkItem{static_cast<int32_t>(k), 0, b});
  return items;
}

// The host copy of the 8-bit lookup tables, built once.
inline const QuantTables& quant_tables() {
  static const QuantTables tables = [] {
    QuantTables t{};
    TORCH_CHECK(t.build(), "peftx: the 8-bit dynamic map bucket table holds two midpoints in one bucket");
    return t;
  }();
  return tables;
}

}  // namespace optim
}  // namespace peftx
