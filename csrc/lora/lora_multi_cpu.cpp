// CPU kernel of the mixed-adapter LoRA forward: rows are grouped by adapter (a counting sort of
// adapter_ids) and each group runs two GEMMs, the CPU analogue of punica's segmented shrink/expand.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "lora/lora_base.h"

namespace peftx {
namespace lora {
namespace {

// y = base_out + s[id] (x A[id]^T) B[id]^T per row; rows with id -1 keep base_out.
at::Tensor lora_multi_fwd_cpu(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                              const at::Tensor& lora_B, const at::Tensor& scalings,
                              const at::Tensor& adapter_ids) {
  constexpr const char* op = "lora_multi_fwd";
  const at::Tensor x2 = check_multi_args(op, x, base_out, lora_A, lora_B, scalings, adapter_ids);
  const int64_t M = x2.size(0), n = lora_A.size(0), N = lora_B.size(1);
  at::Tensor y = base_out.reshape({M, N}).clone(at::MemoryFormat::Contiguous);
  const at::Tensor ids = adapter_ids.contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  // Counting sort of the rows by adapter: rows[start[a] .. start[a + 1]) use adapter a.
  std::vector<int64_t> start(n + 1, 0), rows;
  for (int64_t m = 0; m < M; ++m)
    if (idp[m] >= 0) ++start[idp[m] + 1];
  for (int64_t a = 0; a < n; ++a) start[a + 1] += start[a];
  rows.resize(start[n]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t m = 0; m < M; ++m)
    if (idp[m] >= 0) rows[fill[idp[m]]++] = m;
  const float* sp = scalings.const_data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t count = start[a + 1] - start[a];
      if (count == 0) continue;
      const bool contiguous_run = rows[start[a + 1] - 1] - rows[start[a]] == count - 1;
      if (contiguous_run) {
        // The adapter's rows are one slice: no gather or scatter.
        const int64_t m0 = rows[start[a]];
        const at::Tensor u = at::mm(x2.narrow(0, m0, count), lora_A[a].t());
        y.narrow(0, m0, count).addmm_(u, lora_B[a].t(), 1.0, sp[a]);
      } else {
        const at::Tensor idx = at::from_blob(rows.data() + start[a], {count}, at::kLong);
        const at::Tensor u = at::mm(x2.index_select(0, idx), lora_A[a].t());
        y.index_add_(0, idx, at::mm(u, lora_B[a].t()), sp[a]);
      }
    }
  });
  return y.view(base_out.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CPU, m) { m.impl("lora_multi_fwd", &lora_multi_fwd_cpu); }

}  // namespace lora
}  // namespace peftx
