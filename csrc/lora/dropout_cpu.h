// The LoRA dropout on the CPU: the mask as bytes (1 = kept), and the two elementwise passes of the
// LoRA ops (the dropped-out input, and the dropout's adjoint added into the input gradient), with
// AVX-512 Philox (48 blocks, 384 elements per step) where cpu_isa() allows it and one element at a
// time otherwise (AVX2 has no cheap 64-bit mask spread, so it takes the scalar path).
// Both paths compute exactly the mask of lora_math.h's dropout_keep, and the passes round exactly
// as the scalar code (fp32 multiply, fp32 add, one round to the storage type), so they agree bit
// for bit.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"
#include "lora/lora_math.h"

namespace peftx {
namespace lora {

// Each entry point takes the instruction set to run (isa == avx512: the AVX-512 code, anything else
// the scalar code): callers resolve cpu_isa() once per op, not per row (it reads the environment).

// keep[i] = dropout_keep(d.seed, d.threshold, e0 + i) for i in [0, n).
void dropout_keep_bytes(CpuIsa isa, const Dropout& d, uint64_t e0, int64_t n, uint8_t* keep);

// The same mask packed, for n elements of each of `rows` rows row_stride apart: with W = (n + 63) / 64
// words per row, bit i % 64 of words[r * W + i / 64] = dropout_keep(e0 + r * row_stride + i) for
// i in [0, n) (all rows * W words are overwritten; bits past n are 0).
void dropout_keep_bits(CpuIsa isa, const Dropout& d, uint64_t e0, int64_t row_stride, int64_t rows, int64_t n,
                       uint64_t* words);

// Storage types of the elementwise passes (float64 stays on the callers' scalar loops).
enum class DropDt { kF32, kBF16, kF16 };

// For i in [0, n), with keep_i = dropout_keep(e0 + i):
//   xd[i] = keep_i ? round(float(x[i]) * d.scale) : 0
//   if dx: dx[i] = keep_i ? round(float(dx[i]) + float(t[i]) * d.scale) : dx[i]
// (x, xd, t, dx of type dt; t and dx both null or both given).
void dropout_rows(CpuIsa isa, const Dropout& d, uint64_t e0, int64_t n, DropDt dt, const void* x, void* xd,
                  const void* t, void* dx);

// The instruction set the functions above run for isa: avx512 or scalar.
CpuIsa dropout_isa(CpuIsa isa);

}  // namespace lora
}  // namespace peftx
