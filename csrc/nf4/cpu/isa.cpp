#include "nf4/cpu/isa.h"

#include "nf4/cpu/avx2.h"
#include "nf4/cpu/avx512.h"

#include <string>

#include "common/cpu_isa.h"

namespace peftx {
namespace nf4 {
namespace cpu {

// Detection and PEFTX_CPU_ISA live in common/cpu_isa (shared with the LoRA kernels); the NF4 Isa
// enum mirrors CpuIsa value for value.
static_assert(static_cast<int>(Isa::kScalar) == static_cast<int>(CpuIsa::scalar) &&
              static_cast<int>(Isa::kAvx2) == static_cast<int>(CpuIsa::avx2) &&
              static_cast<int>(Isa::kAvx512) == static_cast<int>(CpuIsa::avx512));

const char* isa_name(Isa isa) { return cpu_isa_name(static_cast<CpuIsa>(isa)); }

bool isa_supported(Isa isa) { return cpu_isa_supported(static_cast<CpuIsa>(isa)); }

bool cpu_has_avx512bf16() { return peftx::cpu_has_avx512bf16(); }

Isa active_isa() { return static_cast<Isa>(cpu_isa()); }

const Kernels& avx512_kernels() {
  static const Kernels table = {"avx512",
                                avx512::quantize_blocks,
                                avx512::double_quantize_blocks,
                                avx512::decode,
                                avx512::double_dequantize,
                                avx512::gemv_rows_f32,
                                32,
                                cpu_has_avx512bf16() ? avx512::gemv_rows_bf16 : nullptr,
                                64,
                                avx512::gemv_t_rows,
                                cpu_has_avx512bf16() ? avx512::gemv_t_bf16 : nullptr,
                                avx512::gemv_t_cols,
                                avx512::perm_x_f32,
                                avx512::gemm_rows_f32,
                                avx512::dot,
                                avx512::axpy};
  return table;
}

const Kernels& avx2_kernels() {
  static const Kernels table = {"avx2",
                                avx2::quantize_blocks,
                                scalar_kernels().double_quantize_blocks,
                                avx2::decode,
                                scalar_kernels().double_dequantize,
                                avx2::gemv_rows_f32,
                                16,
                                nullptr,
                                0,
                                nullptr,
                                nullptr,
                                nullptr,
                                nullptr,
                                nullptr,
                                avx2::dot,
                                avx2::axpy};
  return table;
}

const Kernels& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return avx512_kernels();
    case Isa::kAvx2:
      return avx2_kernels();
    default:
      return scalar_kernels();
  }
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kScalar})
    if (isa_supported(isa)) out.emplace_back(isa_name(isa));
  return out;
}

}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
