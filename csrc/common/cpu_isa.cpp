#include "common/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace peftx {
namespace {

#if defined(__x86_64__) || defined(__i386__)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
}
bool has_avx512bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#else
bool has_avx2() { return false; }
bool has_avx512() { return false; }
bool has_avx512bf16() { return false; }
#endif

}  // namespace

bool cpu_isa_supported(CpuIsa isa) {
  static const bool avx2 = has_avx2(), avx512 = has_avx512();
  return isa == CpuIsa::scalar || (isa == CpuIsa::avx2 && avx2) || (isa == CpuIsa::avx512 && avx512);
}

bool cpu_has_avx512bf16() {
  static const bool v = has_avx512bf16();
  return v;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512:
      return "avx512";
    case CpuIsa::avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

CpuIsa cpu_isa() {
  const char* env = std::getenv("PEFTX_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0)
    return cpu_isa_supported(CpuIsa::avx512) ? CpuIsa::avx512
           : cpu_isa_supported(CpuIsa::avx2) ? CpuIsa::avx2
                                             : CpuIsa::scalar;
  for (CpuIsa isa : {CpuIsa::avx512, CpuIsa::avx2, CpuIsa::scalar}) {
    if (std::strcmp(env, cpu_isa_name(isa)) != 0) continue;
    if (!cpu_isa_supported(isa)) {
      std::string names;
      for (CpuIsa s : {CpuIsa::avx512, CpuIsa::avx2, CpuIsa::scalar})
        if (cpu_isa_supported(s)) names += (names.empty() ? "" : ", ") + std::string(cpu_isa_name(s));
      TORCH_CHECK(false, "PEFTX_CPU_ISA=", env, ": this CPU does not support ", env, " (supported: ", names, ")");
    }
    return isa;
  }
  TORCH_CHECK(false, "PEFTX_CPU_ISA must be avx512, avx2, scalar or auto, got '", env, "'");
}

}  // namespace peftx
