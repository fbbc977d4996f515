#include "common/cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace peftx {
namespace {

CpuIsa detected() {
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
      return CpuIsa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::avx2;
    return CpuIsa::scalar;
  }();
  return isa;
}

}  // namespace

CpuIsa cpu_isa() {
  CpuIsa isa = detected();
  if (const char* env = std::getenv("PEFTX_CPU_ISA")) {
    CpuIsa cap = isa;
    if (std::strcmp(env, "scalar") == 0) cap = CpuIsa::scalar;
    if (std::strcmp(env, "avx2") == 0) cap = CpuIsa::avx2;
    if (static_cast<int>(cap) < static_cast<int>(isa)) isa = cap;
  }
  return isa;
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

}  // namespace peftx
