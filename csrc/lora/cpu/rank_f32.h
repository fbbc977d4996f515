// The rank-r products of lora_linear_fwd / lora_linear_bwd for fp32 inputs on AVX-512 CPUs, with
// the dropout applied on the fly (raw pointers, no torch headers): the fp32 counterparts of
// rank_bf16.h's kernels, with FMA on 16 fp32 lanes where those run vdpbf16ps on pairs. The CPU BLAS
// runs these [tokens, r] x [r, features] shapes at about a fifth of FMA peak.
//
// Rounding: xd = dropout(x) is fp32(x * scale) as the elementwise dropout pass computes it
// (dropout_cpu.h), sums are fp32 in an order of their own, y and dx get y + s acc / dx + scale acc
// in one FMA.
#pragma once

#include <cstdint>

#include "lora/lora_math.h"

namespace peftx {
namespace lora {
namespace cpu {

// Whether the selected instruction set runs the kernels below (cpu_isa() == avx512).
bool rank_f32_supported();

// The largest rank the kernels take (their accumulators live in registers).
constexpr int64_t kMaxRankF32 = 16;

// The rank rounded up to a multiple of 4: the width of the padded [M, RV] operands below.
inline int64_t rank_f32_padded(int64_t R) { return (R + 3) / 4 * 4; }

// u[m, j] = sum_k xd[m, k] A[j, k] for the rows m in [m0, m1) of x [M, K] (xd = x without d).
// A [R, K], u [M, R]. Scratch (used under d): buf, 4 K floats; bits, 4 ((K + 63) / 64) words.
void shrink_f32(const Dropout* d, const float* x, int64_t m0, int64_t m1, int64_t K, const float* A, int64_t R,
                float* buf, uint64_t* bits, float* u);

// y[m, n] += s * sum_j u[m, j] B[n, j] for the rows m in [m0, m1) of y [M, N]; u [M, R],
// BT [R, N] = B^T (transpose_f32).
void expand_f32(const float* u, int64_t m0, int64_t m1, int64_t R, const float* BT, int64_t N, float s, float* y);

// out [cols, rows] = in^T for in [rows, cols]: out[j * rows + n] = in[n * cols + j].
void transpose_f32(const float* in, int64_t rows, int64_t cols, float* out);

// The padded copies the backward reads: out [rows, width] with out[r, j] = in[r, j] * scale for
// j < cols and 0 beyond (scale 1 copies; width >= cols).
void pad_cols_f32(const float* in, int64_t rows, int64_t cols, float scale, int64_t width, float* out);

// gBs[m, j] = fp32(sum_t acc[t][m][j]) * s for the `parts` partials acc [parts, M, 16] (summed in t
// order). gBs [M, R].
void gbs_from_partials_f32(const float* acc, int64_t parts, int64_t M, int64_t R, float s, float* gBs);

// The widest column chunk adjoint_f32 takes.
constexpr int64_t kMaxAdjointColsF32 = 512;

// For the columns k in [k0, k1) of x [M, K] (k0 % 16 == 0, k1 - k0 <= kMaxAdjointColsF32), with
// xd and keep as above (keep = 1 without d) and scale = d->scale (1 without d):
//   dA[j, k] = sum_m xd[m, k] gBs[m, j]          (dA [R, K]; dA^T [K, R] if dA_t)
//   dx[m, k] = dx[m, k] + scale * sum_j gBs[m, j] A[j, k]  where keep, if dx is given.
// gBs: [M, RV] with RV = rank_f32_padded(R) (zero past R). A [R, K] (may be null without dx).
// Scratch: bits, 2 * ((k1 - k0 + 63) / 64) words (used under d); pk, M * 16 * ((k1 - k0 + 15) / 16)
// floats.
//
// With gb (only without d and dx: the dB pass, x = g [M, N], gBs = s u), the same pass over g also
// adds the chunk's share of g B: gb->acc[m * 16 + j] += sum_{k in [k0, k1)} g[m, k] B[k, j], B read
// from gb->Bq [N, 16] (B's rows zero-padded to 16: pad_cols_f32).
struct GbsPartialF32 {
  const float* Bq;  // [N, 16]
  float* acc;       // [M, 16]
};
void adjoint_f32(const Dropout* d, const float* x, int64_t M, int64_t K, int64_t k0, int64_t k1, const float* gBs,
                 const float* A, int64_t R, float* dA, bool dA_t, float* dx, uint64_t* bits, float* pk,
                 const GbsPartialF32* gb = nullptr);

}  // namespace cpu
}  // namespace lora
}  // namespace peftx
