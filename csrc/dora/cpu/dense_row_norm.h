// The AVX-512 kernel of peftx::dense_lora_row_norm on the CPU (raw pointers, no torch headers; the
// host code is dense_row_norm_cpu.cpp): DoRA's norm ||W[o] + scale (B A)[o]|| for a block of rows of
// a dense W, with W + scale B A formed 16 columns at a time in registers and never stored.
#pragma once

#include <cstdint>

#include "dora/dora_math.h"

namespace peftx {
namespace dora {
namespace cpu {

// Rows per call of dense_row_norm_rows (its register tile).
constexpr int64_t kNormRows = 8;
// Ranks per pass over a tile's A columns; the coefficient rows below are padded to a multiple.
constexpr int64_t kNormRankGroup = 8;
inline int64_t norm_rank_padded(int64_t r) { return (r + kNormRankGroup - 1) / kNormRankGroup * kNormRankGroup; }

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

}  // namespace cpu
}  // namespace dora
}  // namespace peftx
