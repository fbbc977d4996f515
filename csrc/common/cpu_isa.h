// Runtime choice of the CPU instruction set for kernels with vectorized variants: the best the CPU
// supports, lowered (never raised) by PEFTX_CPU_ISA=avx512|avx2|scalar, read at each call so tests
// can force every path in one process.
#pragma once

namespace peftx {

enum class CpuIsa : int { scalar = 0, avx2 = 1, avx512 = 2 };

// avx512: avx512f + avx512bw + avx512vl + fma + bmi2; avx2: avx2 + fma.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace peftx
