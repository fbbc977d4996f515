// CPU emulation of the fused AdamW CUDA grids (test-only ops in the peftx_emulate namespace). Each op
// builds the launch adamw_cuda_reg.cpp would make (same work items), walks every (blockIdx,
// threadIdx) of it in grid order and calls the kernels' per-thread functions from adamw_math.h. The
// 8-bit kernel's block reduction is an integer max, so reducing in thread order here is exact.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "common/dispatch.h"
#include "optim/adamw_host.h"
#include "optim/adamw_math.h"

namespace peftx {
namespace optim {
namespace {

void adamw_step_grid(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                     bool maximize, bool increment) {
  constexpr const char* op = "emulate adamw_step";
  const HyperArgs a{lr, beta1, beta2, eps, weight_decay, maximize, increment};
  Prepared<AdamWTensor> prep;
  prepare_adamw(op, params, grads, exp_avgs, exp_avg_sqs, steps, a, prep);
  const AdamWHyper h = make_hyper(a);
  for (size_t k = 0; k < prep.dtypes.size(); ++k) {
    const std::vector<WorkItem> items = work_items(prep.groups[k], kChunk);
    dispatch_float(prep.dtypes[k], op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      for (size_t block = 0; block < items.size(); ++block)
        for (int thread = 0; thread < kThreads; ++thread)
          adamw_thread<T>(static_cast<int64_t>(block), thread, prep.groups[k].data(), items.data(), h);
    });
  }
  prep.args.finish();
}

void adamw8bit_step_grid(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                         at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                         at::TensorList exp_avg_sq_absmax, at::TensorList steps, double lr, double beta1,
                         double beta2, double eps, double weight_decay, bool maximize, bool increment) {
  constexpr const char* op = "emulate adamw8bit_step";
  const HyperArgs a{lr, beta1, beta2, eps, weight_decay, maximize, increment};
  Prepared<AdamW8Tensor> prep;
  prepare_adamw8(op, params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, steps, a,
                 prep);
  const AdamWHyper h = make_hyper(a);
  const QuantTables& q = quant_tables();
  for (size_t k = 0; k < prep.dtypes.size(); ++k) {
    const std::vector<WorkItem> items = work_items(prep.groups[k], kQuantBlock);
    const AdamW8Tensor* tensors = prep.groups[k].data();
    dispatch_float(prep.dtypes[k], op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      std::array<Moments, kThreads> s{};
      for (size_t b = 0; b < items.size(); ++b) {
        const int64_t block = static_cast<int64_t>(b);
        uint32_t m_bits = 0, v_bits = 0;
        for (int thread = 0; thread < kThreads; ++thread) {
          s[thread] = Moments{0.0f, 0.0f};
          if (adamw8_thread_update<T>(block, thread, tensors, items.data(), h, q, s[thread])) {
            m_bits = std::max(m_bits, abs_bits(s[thread].m));
            v_bits = std::max(v_bits, abs_bits(s[thread].v));
          }
        }
        for (int thread = 0; thread < kThreads; ++thread)
          adamw8_thread_store(block, thread, tensors, items.data(), s[thread], m_bits, v_bits, q);
      }
    });
  }
  prep.args.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx_emulate, CPU, m) {
  m.impl("adamw_step_kernel", &adamw_step_grid);
  m.impl("adamw8bit_step_kernel", &adamw8bit_step_grid);
}

}  // namespace optim
}  // namespace peftx
