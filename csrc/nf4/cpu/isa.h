// Which CPU kernel table the NF4 ops run: the best this CPU supports, or the one named by the
// environment variable PEFTX_CPU_ISA (avx512 | avx2 | scalar | auto), read at every call so tests
// and benchmarks can force each path in one process.
#pragma once

#include <string>
#include <vector>

#include "nf4/cpu/kernels.h"

namespace peftx {
namespace nf4 {
namespace cpu {

enum class Isa { kScalar, kAvx2, kAvx512 };

const char* isa_name(Isa isa);
bool isa_supported(Isa isa);
// Whether the AVX-512 table may use the bf16 dot-product instructions (avx512_bf16).
bool cpu_has_avx512bf16();
// The table selected now (throws c10::Error naming PEFTX_CPU_ISA if it asks for an unknown or
// unsupported instruction set).
Isa active_isa();
const Kernels& kernels_for(Isa isa);
inline const Kernels& active_kernels() { return kernels_for(active_isa()); }
// Names of the instruction sets this CPU supports, best first.
std::vector<std::string> supported_isas();

}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
