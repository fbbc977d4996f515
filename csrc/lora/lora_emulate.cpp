// CPU emulation of the LoRA CUDA grids (test-only ops in peftx_emulate): every thread of the launch
// lora_cuda.cu would make, its bounds test, and the same per-thread function from lora_math.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "lora/lora_math.h"

namespace peftx {
namespace lora {
namespace {

constexpr int64_t kThreads = 256;  // lora_cuda.cu's block size

template <typename Fn>
void for_each_thread(int64_t work, Fn&& fn) {
  const int64_t grid = (work + kThreads - 1) / kThreads;
  for (int64_t t = 0; t < grid * kThreads; ++t) fn(t);
}

at::Tensor dropout_grid(const at::Tensor& x, int64_t seed, double p) {
  const at::Tensor xc = x.contiguous();
  at::Tensor xd = at::empty_like(xc);
  const Dropout d = make_dropout(static_cast<uint64_t>(seed), p);
  const int64_t n = xc.numel();
  dispatch_float(xc.scalar_type(), "emulate lora_dropout", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = reinterpret_cast<const T*>(xc.const_data_ptr());
    T* dst = reinterpret_cast<T*>(xd.data_ptr());
    for_each_thread((n + kDropBlock - 1) / kDropBlock, [&](int64_t q) {
      if (kDropBlock * q < n) dropout_apply_block(q, src, n, d, dst);
    });
  });
  return xd;
}

at::Tensor dropout_axpy_grid(const at::Tensor& t, const at::Tensor& dx, int64_t seed, double p) {
  const at::Tensor tc = t.contiguous();
  at::Tensor out = dx.contiguous().clone();
  const Dropout d = make_dropout(static_cast<uint64_t>(seed), p);
  const int64_t n = tc.numel();
  dispatch_float(tc.scalar_type(), "emulate lora_dropout_axpy", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = reinterpret_cast<const T*>(tc.const_data_ptr());
    T* dst = reinterpret_cast<T*>(out.data_ptr());
    for_each_thread((n + kDropBlock - 1) / kDropBlock, [&](int64_t q) {
      if (kDropBlock * q < n) dropout_axpy_block(q, src, n, d, dst);
    });
  });
  return out;
}

at::Tensor multi_grid(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                      const at::Tensor& lora_B, const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  const int64_t K = x.size(-1), M = x.numel() / K, R = lora_A.size(1), N = lora_B.size(1);
  const at::Tensor x2 = x.reshape({M, K}).contiguous(), A = lora_A.contiguous(), B = lora_B.contiguous(),
                   s = scalings.contiguous(), ids = adapter_ids.contiguous();
  at::Tensor y = base_out.reshape({M, N}).clone(at::MemoryFormat::Contiguous);
  at::Tensor u = at::empty({M, R}, x2.options().dtype(at::kFloat));
  dispatch_float(x2.scalar_type(), "emulate lora_multi", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xp = reinterpret_cast<const T*>(x2.const_data_ptr());
    const T* ap = reinterpret_cast<const T*>(A.const_data_ptr());
    const T* bp = reinterpret_cast<const T*>(B.const_data_ptr());
    const int64_t* idp = ids.const_data_ptr<int64_t>();
    float* up = u.data_ptr<float>();
    for_each_thread(M * R, [&](int64_t i) {
      if (i < M * R) up[i] = multi_shrink_one(i / R, i % R, xp, K, ap, R, idp);
    });
    for_each_thread(M * N, [&](int64_t i) {
      if (i < M * N)
        multi_expand_one(i / N, i % N, up, R, bp, N, s.const_data_ptr<float>(), idp,
                         reinterpret_cast<T*>(y.data_ptr()));
    });
  });
  return y.view(base_out.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx_emulate, CPU, m) {
  m.impl("lora_dropout_kernel", &dropout_grid);
  m.impl("lora_dropout_axpy_kernel", &dropout_axpy_grid);
  m.impl("lora_multi_kernel", &multi_grid);
}

}  // namespace lora
}  // namespace peftx
