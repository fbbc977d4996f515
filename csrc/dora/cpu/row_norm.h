// The AVX-512 kernels of DoRA's row norm on the CPU (raw pointers, no torch headers; the host code
// is dense_row_norm_cpu.cpp and dora_cpu.cpp): ||W[o] + scale (B A)[o]|| for a tile of rows of a
// dense or an NF4 W, with W + scale B A formed in registers and never stored.
#pragma once

#include <cstdint>

#include "dora/dora_math.h"
#include "nf4/cpu/kernels.h"

namespace peftx {
namespace dora {
namespace cpu {

// Rows per call of dense_row_norm_rows (its register tile).
constexpr int64_t kNormRows = 8;
// Ranks per pass over a tile's A columns; the coefficient rows below are padded to a multiple.
constexpr int64_t kNormRankGroup = 8;
inline int64_t norm_rank_padded(int64_t r) { return (r + kNormRankGroup - 1) / kNormRankGroup * kNormRankGroup; }

// c[o * rp + rr] = scale * B[o, rr] (rp = norm_rank_padded(r), zero past r): the rows' coefficients
// that both kernels take, for B [rows, r] fp32.
inline void norm_coefficients(const float* B, int64_t rows, int64_t r, float scale, float* c) {
  const int64_t rp = norm_rank_padded(r);
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t rr = 0; rr < rp; ++rr) c[o * rp + rr] = rr < r ? scale * B[o * r + rr] : 0.0f;
}

// A [r, cols] fp32 repacked for the kernel: per 16-column chunk c, its rp = norm_rank_padded(r) rank
// vectors, Ap[(c * rp + rr) * 16 + l] = A[rr, 16 c + l], zero past r and past cols. Ap holds
// norm_packed_a_size(r, cols) floats.
inline int64_t norm_packed_a_size(int64_t r, int64_t cols) { return (cols + 15) / 16 * norm_rank_padded(r) * 16; }
void pack_norm_a(const float* A, int64_t r, int64_t cols, float* Ap);

// norm[i] = ||W[i] + sum_rr c[i * rp + rr] A[rr]||_2 for the rows i < nrows (<= kNormRows) of W
// [nrows, cols] (row-major, dt), with A packed by pack_norm_a and c the rows' coefficients scale *
// B[o, rr], rp = norm_rank_padded(r) per row, zero past r. fp32 sums in an order of their own.
void dense_row_norm_rows(DenseDt dt, const void* W, int64_t nrows, int64_t cols, const float* Ap, int64_t r,
                         const float* c, float* norm);

// The NF4 tile: kNf4NormRows rows x 32 columns, each 32-column run decoded from 16 bytes as its even
// and its odd columns (the high and low nibbles), so A is packed in that order: per 32-column chunk c,
// per rank rr of rp, A[rr, 32 c + 2 l] for l < 16 then A[rr, 32 c + 2 l + 1], zero past r
// (nf4_norm_packed_a_size floats). Requires cols % 32 == 0 and blocksize % 32 == 0, so a run lies
// in one block and starts on a byte.
constexpr int64_t kNf4NormRows = 4;
inline int64_t nf4_norm_packed_a_size(int64_t r, int64_t cols) { return cols / 32 * norm_rank_padded(r) * 32; }
void pack_nf4_norm_a(const float* A, int64_t r, int64_t cols, float* Ap);

// norm[i] = ||dequant(W)[o0 + i] + sum_rr c[i * rp + rr] A[rr]||_2 for i < nrows (<= kNf4NormRows),
// W's rows o0.. of w (w.cols columns), A packed by pack_nf4_norm_a, c as dense_row_norm_rows'.
void nf4_row_norm_rows(const nf4::cpu::Weight4& w, int64_t o0, int64_t nrows, const float* Ap, int64_t r,
                       const float* c, float* norm);

}  // namespace cpu
}  // namespace dora
}  // namespace peftx
