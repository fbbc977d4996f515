// Autocast behaviour of the LoRA forwards ("lower precision fp" policy, as torch.nn.functional.linear):
// the activation, a dense base weight and the bias are cast to the autocast
// dtype; a 4-bit base state (packed bytes, fp32 absmax, code) never is, nor are the adapter weights
// (the op runs the low-rank products in x's dtype and returns fp32 gradients for fp32 adapters).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace peftx {
namespace lora {
namespace {

template <c10::DeviceType device, c10::DispatchKey key>
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_autocast(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& absmax,
    const c10::optional<at::Tensor>& code, int64_t blocksize, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p, int64_t seed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftx::lora_linear_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, int64_t, const c10::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, double, double, int64_t)>();
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, device); };
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = cast(*bias);
  const at::Tensor w = absmax.has_value() ? weight : cast(weight);
  // Adapters stay as they are: the op computes in x's dtype and returns their gradients in theirs.
  return op.call(cast(x), w, absmax, code, blocksize, b, lora_A, lora_B, scaling, dropout_p, seed);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor lora_multi_fwd_autocast(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                                   const at::Tensor& lora_B, const at::Tensor& scalings,
                                   const at::Tensor& adapter_ids) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftx::lora_multi_fwd", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, device); };
  return op.call(cast(x), cast(base_out), cast(lora_A), cast(lora_B), scalings, adapter_ids);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, AutocastCPU, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("lora_multi_fwd", &lora_multi_fwd_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(peftx, AutocastCUDA, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("lora_multi_fwd", &lora_multi_fwd_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace lora
}  // namespace peftx
