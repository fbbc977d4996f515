// The LoRA dropout mask on the CPU as bytes (1 = kept), generated 64 elements at a time with
// AVX-512 Philox where cpu_isa() allows it, one element at a time otherwise (AVX2 has no cheap
// 64-bit mask spread, so it takes the scalar path).
// Both paths compute exactly the mask of lora_math.h's dropout_keep.
#pragma once

#include <cstdint>

#include "lora/lora_math.h"

namespace peftx {
namespace lora {

// keep[i] = dropout_keep(d.seed, d.threshold, e0 + i) for i in [0, n).
void dropout_keep_bytes(const Dropout& d, uint64_t e0, int64_t n, uint8_t* keep);

// The instruction set dropout_keep_bytes uses now: "avx512" or "scalar" (see common/cpu_isa.h).
const char* dropout_isa();

}  // namespace lora
}  // namespace peftx
