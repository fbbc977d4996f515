// Autocast behaviour of the NF4 products: like torch.matmul ("lower precision fp" policy), the
// activation and bias are cast to the autocast dtype and the product computes in it; the 4-bit
// state is never cast (absmax and code stay fp32).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace peftx {
namespace nf4 {
namespace {

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor nf4_matmul_autocast(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const at::Tensor& code, int64_t blocksize, int64_t out_features,
                               const c10::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftx::nf4_matmul", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, int64_t,
                                         const c10::optional<at::Tensor>&)>();
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = at::autocast::cached_cast(dtype, *bias, device);
  return op.call(at::autocast::cached_cast(dtype, x, device), packed, absmax, code, blocksize,
                 out_features, b);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor nf4_matmul_t_autocast(const at::Tensor& grad, const at::Tensor& packed,
                                 const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                                 int64_t in_features) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftx::nf4_matmul_t", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, int64_t)>();
  return op.call(at::autocast::cached_cast(dtype, grad, device), packed, absmax, code, blocksize,
                 in_features);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, AutocastCPU, m) {
  m.impl("nf4_matmul", &nf4_matmul_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("nf4_matmul_t", &nf4_matmul_t_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(peftx, AutocastCUDA, m) {
  m.impl("nf4_matmul", &nf4_matmul_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("nf4_matmul_t", &nf4_matmul_t_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace nf4
}  // namespace peftx
