#include "nf4/cpu/isa.h"

#include "nf4/cpu/avx2.h"
#include "nf4/cpu/avx512.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace peftx {
namespace nf4 {
namespace cpu {

namespace {

#if defined(__x86_64__) || defined(__i386__)
bool has(const char* feature_set) {
  __builtin_cpu_init();
  // __builtin_cpu_supports needs literal names, hence the explicit lists.
  if (std::strcmp(feature_set, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (std::strcmp(feature_set, "avx512") == 0)
    return has("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(feature_set, "avx512bf16") == 0) return has("avx512") && __builtin_cpu_supports("avx512bf16");
  return false;
}
#else
bool has(const char*) { return false; }
#endif

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool isa_supported(Isa isa) {
  static const bool avx2 = has("avx2"), avx512 = has("avx512");
  return isa == Isa::kScalar || (isa == Isa::kAvx2 && avx2) || (isa == Isa::kAvx512 && avx512);
}

bool cpu_has_avx512bf16() {
  static const bool v = has("avx512bf16");
  return v;
}

Isa active_isa() {
  const char* env = std::getenv("PEFTX_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0)
    return isa_supported(Isa::kAvx512) ? Isa::kAvx512 : isa_supported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kScalar}) {
    if (std::strcmp(env, isa_name(isa)) != 0) continue;
    if (!isa_supported(isa)) {
      std::string names;
      for (const std::string& s : supported_isas()) names += (names.empty() ? "" : ", ") + s;
      TORCH_CHECK(false, "PEFTX_CPU_ISA=", env, ": this CPU does not support ", env, " (supported: ", names, ")");
    }
    return isa;
  }
  TORCH_CHECK(false, "PEFTX_CPU_ISA must be avx512, avx2, scalar or auto, got '", env, "'");
}

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
