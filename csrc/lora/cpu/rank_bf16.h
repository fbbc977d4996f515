// The rank-r products of lora_linear_fwd / lora_linear_bwd for bf16 inputs on AVX-512 BF16 CPUs,
// with the dropout applied on the fly (raw pointers, no torch headers). They replace the at::mm
// calls on [tokens, r] and [r, in_features] operands, whose BLAS calls run far below bandwidth at
// these shapes, and fuse the backward's two products over the input into one pass.
//
// Rounding: xd = dropout(x) is rounded to bf16 exactly as the elementwise dropout pass rounds it
// (dropout_cpu.h), products are summed in fp32 (vdpbf16ps, which flushes subnormals), and each result
// is rounded once (y and dx: y + s acc in one FMA, then to bf16).
#pragma once

#include <cstdint>

#include "lora/lora_math.h"

namespace peftx {
namespace lora {
namespace cpu {

// Whether this CPU and the selected instruction set run the kernels below (cpu_isa() == avx512 and
// AVX-512 BF16).
bool rank_bf16_supported();

// The largest rank expand_bf16 and adjoint_bf16 take (their accumulators live in registers).
constexpr int64_t kMaxRank = 16;

// u[m, j] = bf16(sum_k xd[m, k] A[j, k]) for the rows m in [m0, m1) of x [M, K], with xd = x when d
// is null and dropout(x) under d otherwise. A [R, K] bf16, u [M, R]. Scratch (used under d): buf,
// 4 K bf16; bits, 4 ((K + 63) / 64) words.
void shrink_bf16(const Dropout* d, const uint16_t* x, int64_t m0, int64_t m1, int64_t K, const uint16_t* A,
                 int64_t R, uint16_t* buf, uint64_t* bits, uint16_t* u);

// y[m, n] = bf16(y[m, n] + s * sum_j u[m, j] B[n, j]) for the rows m in [m0, m1) of y [M, N], u [M, R]
// bf16, R <= kMaxRank; BTp: [(R + 1) / 2, N] dwords, BTp[i][n] = (B[n, 2 i], B[n, 2 i + 1]) (0 past R).
void expand_bf16(const uint16_t* u, int64_t m0, int64_t m1, int64_t R, const uint32_t* BTp, int64_t N, float s,
                 uint16_t* y);

// The two layouts of B [N, R] bf16 (R <= kMaxRank) the kernels read:
// Bp [(N + 1) / 2, 16] dwords, Bp[q][j] = (B[2 q, j], B[2 q + 1, j]) (0 past N and R), for adjoint_bf16's g B;
// BTp [(R + 1) / 2, N] dwords, BTp[i][n] = (B[n, 2 i], B[n, 2 i + 1]) (0 past R), for expand_bf16.
void pack_row_pairs_bf16(const uint16_t* B, int64_t N, int64_t R, uint32_t* Bp);
void pack_rank_pairs_t_bf16(const uint16_t* B, int64_t N, int64_t R, uint32_t* BTp);

// gT [(M + 1) / 2, R2] dwords, gT[h][j] = (gs[2 h, j], gs[2 h + 1, j]) for j < R (0 past M and for j in
// [R, R2)), gs = g [M, R] bf16, or bf16(float(g) * *scale) where scale is given. R <= R2 <= 16.
void pack_row_pairs_t_bf16(const uint16_t* g, int64_t M, int64_t R, const float* scale, int64_t R2, uint32_t* gT);

// gBs[m, j] = bf16(bf16(sum_t acc[t][m][j]) * s) for the `parts` fp32 partials acc [parts, M, 16] of
// adjoint_bf16's g B (summed in t order). gBs [M, R].
void gbs_from_partials(const float* acc, int64_t parts, int64_t M, int64_t R, float s, uint16_t* gBs);

// The widest column chunk adjoint_bf16 takes.
constexpr int64_t kMaxAdjointCols = 512;

// For the columns k in [k0, k1) of x [M, K] (k0 % 16 == 0, k1 - k0 <= kMaxAdjointCols), with xd and
// keep as above (keep = 1 without d) and scale = d->scale (1 without d):
//   dA[j, k] = sum_m xd[m, k] gBs[m, j]          (fp32, dA [R, K]; dA^T [K, R] if dA_t)
//   dx[m, k] = bf16(dx[m, k] + scale * sum_j gBs[m, j] A[j, k])  where keep, if dx is given.
// R <= kMaxRank. gBs: [M, R2] bf16 with R2 = R rounded up to even (a zero column if R is
// odd); gBsT: [(M + 1) / 2, R2] dwords, gBsT[i][j] = (gBs[2 i, j], gBs[2 i + 1, j]) (0 past M and R).
// A [R, K] bf16 (may be null without dx). Scratch: bits, 2 * ((k1 - k0 + 63) / 64) words (used under
// d); pk, 16 * ((k1 - k0 + 15) / 16) * ((M + 1) / 2) dwords.
//
// With gb (only without d and dx: the dB pass, x = g [M, N], gBs = s u), the same pass over g also
// adds the chunk's share of g B: gb->acc[m * 16 + j] += sum_{k in [k0, k1)} g[m, k] B[k, j] (fp32,
// 4 partial sums per row), B read from gb->Bp (pack_row_pairs_bf16's layout): gB without a second
// read of g from memory.
struct GbsPartial {
  const uint32_t* Bp;  // [(N + 1) / 2, 16] dwords
  float* acc;          // [M, 16] fp32
};
void adjoint_bf16(const Dropout* d, const uint16_t* x, int64_t M, int64_t K, int64_t k0, int64_t k1,
                  const uint16_t* gBs, const uint32_t* gBsT, const uint16_t* A, int64_t R, float* dA, bool dA_t,
                  uint16_t* dx, uint64_t* bits, uint32_t* pk, const GbsPartial* gb = nullptr);

}  // namespace cpu
}  // namespace lora
}  // namespace peftx
