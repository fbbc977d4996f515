// Runtime choice of the CPU instruction set for every kernel family with vectorized variants (NF4,
// LoRA): the best this CPU supports, or the one named by PEFTX_CPU_ISA (avx512 | avx2 | scalar |
// auto), read at each call so tests and benchmarks can force every path in one process.
#pragma once

namespace peftx {

enum class CpuIsa : int { scalar = 0, avx2 = 1, avx512 = 2 };

// avx2: avx2 + fma + f16c. avx512: avx2 + avx512f/bw/vl/dq + bmi2.
bool cpu_isa_supported(CpuIsa isa);
bool cpu_has_avx512bf16();
// The instruction set selected now; throws c10::Error naming PEFTX_CPU_ISA if it asks for an unknown
// or unsupported one.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace peftx
