// CPU kernel of peftx::nf4_lora_row_norm (DoRA's weight norm over an NF4 base, see dora_math.h).
// Rows are split over threads (at::parallel_for). On AVX-512 CPUs, with in_features and blocksize
// multiples of 32, tiles of 4 rows x 32 columns are decoded and combined with the rank-r term in
// registers (cpu/row_norm.h). Otherwise each row is decoded into a thread-local fp32 row buffer by
// the NF4 kernel table's vectorized decode, the rank-r term is added with its axpy (four rank-1
// updates per pass over the row) and the sum of squares is its dot. Either way the dense weight never
// exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_isa.h"
#include "dora/cpu/row_norm.h"
#include "dora/dora_checks.h"
#include "dora/row_norm_host.h"
#include "nf4/cpu/isa.h"

namespace peftx {
namespace dora {
namespace {

// Rows per parallel task: about 2^15 decoded elements.
int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cols, 1)); }

at::Tensor nf4_lora_row_norm_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                 int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scale) {
  auto [A, B] = check_row_norm_args(packed, absmax, code, blocksize, lora_A, lora_B);
  const int64_t rows = B.size(0), cols = A.size(1), r = A.size(0);
  const at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  at::Tensor norm = at::empty({rows}, packed.options().dtype(at::kFloat));
  const nf4::cpu::Kernels& kt = nf4::cpu::active_kernels();
  const nf4::cpu::Weight4 w{pk.const_data_ptr<uint8_t>(), am.const_data_ptr<float>(), cd.const_data_ptr<float>(),
                            blocksize, rows, cols};
  const float* a = A.const_data_ptr<float>();
  const float* b = B.const_data_ptr<float>();
  float* out = norm.data_ptr<float>();
  const float s = static_cast<float>(scale);
  if (cpu_isa() == CpuIsa::avx512 && cols % 32 == 0 && blocksize % 32 == 0 && rows > 0) {
    for_each_norm_tile(rows, cols, a, b, r, scale, /*even_odd=*/true,
                       [&](int64_t o, int64_t n, const float* ap, const float* c) {
                         cpu::nf4_row_norm_rows(w, o, n, ap, r, c, out + o);
                       });
    return norm;
  }
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t o0, int64_t o1) {
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t o = o0; o < o1; ++o) {
      kt.decode(w, o * cols, (o + 1) * cols, nf4::cpu::Dt::kF32, row.data());
      for (int64_t r0 = 0; r0 < r; r0 += 4) {
        const int nv = static_cast<int>(std::min<int64_t>(4, r - r0));
        float c[4];
        const float* v[4];
        for (int i = 0; i < nv; ++i) {
          c[i] = s * b[o * r + r0 + i];
          v[i] = a + (r0 + i) * cols;
        }
        kt.axpy(nv, c, v, cols, row.data());
      }
      out[o] = std::sqrt(kt.dot(row.data(), row.data(), cols));
    }
  });
  return norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CPU, m) { m.impl("nf4_lora_row_norm", &nf4_lora_row_norm_cpu); }

}  // namespace dora
}  // namespace peftx
