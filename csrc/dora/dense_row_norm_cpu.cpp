// CPU kernel of peftx::dense_lora_row_norm (DoRA's weight norm over a dense base, see dora_math.h).
// On AVX-512 CPUs, tiles of kNormRows rows split over threads, each formed and squared in registers
// (cpu/row_norm.h); otherwise blocks of rows through BLAS (W's rows widened to fp32 into a
// per-thread buffer, scale B A added by addmm, their norms taken), so the whole W + scale B A is
// never materialised either way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_isa.h"
#include "common/thread_scratch.h"
#include "dora/cpu/row_norm.h"
#include "dora/dora_checks.h"
#include "dora/row_norm_host.h"

namespace peftx {
namespace dora {
namespace {

void norms_avx512(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale, at::Tensor& norm) {
  const int64_t cols = W.size(1), r = A.size(0);
  const char* w = static_cast<const char*>(W.const_data_ptr());
  const int64_t row_bytes = cols * W.element_size();
  float* out = norm.data_ptr<float>();
  const DenseDt dt = dense_dt(W);
  for_each_norm_tile(W.size(0), cols, A.const_data_ptr<float>(), B.const_data_ptr<float>(), r, scale,
                     /*even_odd=*/false, [&](int64_t o, int64_t n, const float* ap, const float* c) {
                       cpu::dense_row_norm_rows(dt, w + o * row_bytes, n, cols, ap, r, c, out + o);
                     });
}

void norms_blas(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale, at::Tensor& norm) {
  const int64_t rows = W.size(0), cols = W.size(1);
  // 4 MiB of fp32 rows per block; the BLAS and the norm run multithreaded themselves.
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(cols, 1));
  for (int64_t o = 0; o < rows; o += block) {
    const int64_t n = std::min(block, rows - o);
    at::Tensor v = thread_scratch(kDoraNormSlot, {n, cols}, W.options().dtype(at::kFloat));
    v.copy_(W.narrow(0, o, n));
    v.addmm_(B.narrow(0, o, n), A, 1.0, scale);
    at::Tensor out = norm.narrow(0, o, n);
    at::linalg_vector_norm_out(out, v, 2, at::IntArrayRef{1});
  }
}

at::Tensor dense_lora_row_norm_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                   double scale) {
  auto [W, A, B] = check_dense_row_norm_args(weight, lora_A, lora_B);
  at::Tensor norm = at::empty({W.size(0)}, W.options().dtype(at::kFloat));
  if (W.size(0) == 0) return norm;
  if (cpu_isa() == CpuIsa::avx512) {
    norms_avx512(W, A, B, scale, norm);
  } else {
    norms_blas(W, A, B, scale, norm);
  }
  return norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CPU, m) { m.impl("dense_lora_row_norm", &dense_lora_row_norm_cpu); }

}  // namespace dora
}  // namespace peftx
