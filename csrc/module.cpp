// The peftx._C Python module. Importing it runs the static TORCH_LIBRARY registrations; the
// functions below report how the library was built and what this CPU can do.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>
#include <vector>

#include "lora/cpu/rank_bf16.h"
#include "lora/cpu/rank_f32.h"
#include "lora/dropout_cpu.h"
#include "nf4/cpu/isa.h"
#include "nf4/cpu/plan.h"
#include "nf4/nf4_math.h"
#include "optim/dynamic_map.h"

namespace {

std::map<std::string, bool> cpu_features() {
  std::map<std::string, bool> f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f["avx2"] = __builtin_cpu_supports("avx2");
  f["fma"] = __builtin_cpu_supports("fma");
  f["f16c"] = __builtin_cpu_supports("f16c");
  f["avx512f"] = __builtin_cpu_supports("avx512f");
  f["avx512bw"] = __builtin_cpu_supports("avx512bw");
  f["avx512vl"] = __builtin_cpu_supports("avx512vl");
  f["avx512vnni"] = __builtin_cpu_supports("avx512vnni");
  f["avx512bf16"] = __builtin_cpu_supports("avx512bf16");
#endif
  return f;
}

template <size_t N>
std::vector<float> table(const float (&t)[N]) {
  return std::vector<float>(t, t + N);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "peftx native kernels (torch ops in the peftx namespace)";
  m.def("cuda_built", [] {
#ifdef PEFTX_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build compiled and linked the CUDA kernels.");
  m.def("cuda_archs", [] { return std::string(PEFTX_CUDA_ARCHS); },
        "The CUDA architectures this build targets (empty without CUDA).");
  m.def("cpu_features", &cpu_features, "Instruction set extensions of this CPU.");
  m.def("lora_dropout_isa", [] { return std::string(peftx::cpu_isa_name(peftx::lora::dropout_isa(peftx::cpu_isa()))); },
        "Instruction set of the CPU LoRA dropout-mask generator (PEFTX_CPU_ISA=scalar forces scalar).");
  m.def("lora_rank_bf16_supported", &peftx::lora::cpu::rank_bf16_supported,
        "Whether the LoRA ops run their bf16 rank-r products on the AVX-512 BF16 kernels now.");
  m.def("lora_rank_bf16_max_rank", [] { return peftx::lora::cpu::kMaxRank; },
        "The largest rank the bf16 LoRA expand and backward kernels take (larger ranks use the BLAS).");
  m.def("lora_rank_f32_supported", &peftx::lora::cpu::rank_f32_supported,
        "Whether the LoRA ops run their fp32 rank-r products on the AVX-512 kernels now.");
  m.def("lora_rank_f32_max_rank", [] { return peftx::lora::cpu::kMaxRankF32; },
        "The largest rank the fp32 LoRA kernels take (larger ranks use the BLAS).");
  m.def("cpu_isa", [] { return std::string(peftx::nf4::cpu::isa_name(peftx::nf4::cpu::active_isa())); },
        "The CPU kernel table the NF4 ops run now (PEFTX_CPU_ISA=avx512|avx2|scalar|auto forces one).");
  m.def("cpu_isas", &peftx::nf4::cpu::supported_isas, "The CPU kernel tables this CPU supports, best first.");
  m.def("cpu_bf16_gemv", &peftx::nf4::cpu::cpu_has_avx512bf16,
        "Whether the AVX-512 table runs bf16 activations on the bf16 dot-product kernel.");
  m.def("nf4_gemm_tile_rows", &peftx::nf4::cpu::gemm_tile_rows,
        "Rows of W per decoded tile of nf4_matmul's GEMM path (rows, cols, element bytes).");
  m.def("nf4_gemm_tile_cols", &peftx::nf4::cpu::gemm_tile_cols,
        "Columns of W per decoded tile of nf4_matmul_t's GEMM path (rows, cols, element bytes).");
  m.def("nf4_gemv_max_tokens", [] { return peftx::nf4::cpu::kGemvMaxTokens; },
        "Tokens up to which nf4_matmul / nf4_matmul_t run the GEMV kernels on the CPU.");
  m.def("nf4_tile_bytes", [] { return peftx::nf4::cpu::kTileBytes; },
        "Byte budget of one decoded tile of the CPU GEMM paths.");
  m.def("nf4_code", [] { return table(peftx::nf4::kCode); }, "The NF4 code book (16 fp32).");
  m.def("nf4_midpoints", [] { return table(peftx::nf4::kMidpoints); },
        "The NF4 encoder's decision boundaries (15 fp32).");
  m.def("dynamic_code", [] { return table(peftx::nf4::kDynamicCode); },
        "bitsandbytes' signed 8-bit dynamic map (256 fp32), the double-quant code book.");
  m.def("unsigned_dynamic_code", [] { return table(peftx::optim::kUnsignedDynamicCode); },
        "bitsandbytes' unsigned 8-bit dynamic map (256 fp32): the 8-bit Adam second-moment code book.");
}
