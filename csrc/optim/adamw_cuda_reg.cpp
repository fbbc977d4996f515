// CUDA registration of the fused AdamW ops: argument checks, the per-tensor structs and work items
// built on the host (adamw_host.h) and copied to the device in one transfer, the current stream,
// the launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "common/cuda_reg.h"
#include "optim/adamw_cuda.h"
#include "optim/adamw_host.h"

namespace peftx {
namespace optim {
namespace {

// The launch's tensor structs followed by its work items, in one device buffer (staged through
// pinned memory; the caching host allocator keeps the staging buffer until the copy has run).
template <typename Tensor>
at::Tensor upload(const std::vector<Tensor>& tensors, const std::vector<WorkItem>& items, const at::Device& dev) {
  const size_t tb = tensors.size() * sizeof(Tensor), ib = items.size() * sizeof(WorkItem);
  const size_t off = (tb + 15) / 16 * 16;
  at::Tensor host = at::empty({static_cast<int64_t>(off + ib)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), tensors.data(), tb);
  std::memcpy(host.data_ptr<uint8_t>() + off, items.data(), ib);
  return host.to(dev, /*non_blocking=*/true);
}

// The 8-bit lookup tables on each device, copied once and kept for the life of the process
// (deliberately never freed: static CUDA tensors would be destroyed after the CUDA context).
const QuantTables* device_tables(const at::Device& dev) {
  static std::mutex mu;
  static std::vector<at::Tensor*> cache(static_cast<size_t>(c10::cuda::device_count()), nullptr);
  const std::lock_guard<std::mutex> lock(mu);
  at::Tensor*& slot = cache.at(static_cast<size_t>(dev.index()));
  if (slot == nullptr) {
    const QuantTables& q = quant_tables();
    at::Tensor host = at::empty({static_cast<int64_t>(sizeof(QuantTables))}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(host.data_ptr<uint8_t>(), &q, sizeof(QuantTables));
    slot = new at::Tensor(host.to(dev));
  }
  return reinterpret_cast<const QuantTables*>(slot->const_data_ptr<uint8_t>());
}

at::Device device_of(at::TensorList params) {
  TORCH_CHECK(!params.empty(), "peftx adamw: empty parameter list");
  return params[0].device();
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                     bool maximize, bool increment) {
  constexpr const char* op = "adamw_step";
  const HyperArgs a{lr, beta1, beta2, eps, weight_decay, maximize, increment};
  Prepared<AdamWTensor> prep;
  prepare_adamw(op, params, grads, exp_avgs, exp_avg_sqs, steps, a, prep);
  if (prep.dtypes.empty()) return;
  const at::Device dev = device_of(params);
  TORCH_CHECK(dev.is_cuda(), op, ": params must be CUDA tensors on the CUDA path, got ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const AdamWHyper h = make_hyper(a);
  for (size_t k = 0; k < prep.dtypes.size(); ++k) {
    const std::vector<WorkItem> items = work_items(prep.groups[k], kChunk);
    const at::Tensor meta = upload(prep.groups[k], items, dev);
    const uint8_t* base = meta.const_data_ptr<uint8_t>();
    const size_t off = (prep.groups[k].size() * sizeof(AdamWTensor) + 15) / 16 * 16;
    C10_CUDA_CHECK(launch_adamw(kind_of(prep.dtypes[k], "peftx adamw"), reinterpret_cast<const AdamWTensor*>(base),
                                reinterpret_cast<const WorkItem*>(base + off), static_cast<int64_t>(items.size()), h,
                                stream));
  }
  prep.args.finish();
}

void adamw8bit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                         at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                         at::TensorList exp_avg_sq_absmax, at::TensorList steps, double lr, double beta1,
                         double beta2, double eps, double weight_decay, bool maximize, bool increment) {
  constexpr const char* op = "adamw8bit_step";
  const HyperArgs a{lr, beta1, beta2, eps, weight_decay, maximize, increment};
  Prepared<AdamW8Tensor> prep;
  prepare_adamw8(op, params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, steps, a,
                 prep);
  if (prep.dtypes.empty()) return;
  const at::Device dev = device_of(params);
  TORCH_CHECK(dev.is_cuda(), op, ": params must be CUDA tensors on the CUDA path, got ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const AdamWHyper h = make_hyper(a);
  const QuantTables* tables = device_tables(dev);
  for (size_t k = 0; k < prep.dtypes.size(); ++k) {
    const std::vector<WorkItem> items = work_items(prep.groups[k], kQuantBlock);
    const at::Tensor meta = upload(prep.groups[k], items, dev);
    const uint8_t* base = meta.const_data_ptr<uint8_t>();
    const size_t off = (prep.groups[k].size() * sizeof(AdamW8Tensor) + 15) / 16 * 16;
    C10_CUDA_CHECK(launch_adamw8(kind_of(prep.dtypes[k], "peftx adamw"), reinterpret_cast<const AdamW8Tensor*>(base),
                                 reinterpret_cast<const WorkItem*>(base + off), static_cast<int64_t>(items.size()), h,
                                 tables, stream));
  }
  prep.args.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CUDA, m) {
  m.impl("adamw_step", &adamw_step_cuda);
  m.impl("adamw8bit_step", &adamw8bit_step_cuda);
}

}  // namespace optim
}  // namespace peftx
