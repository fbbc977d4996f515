// The AVX-512 kernels of DoRA's row norm on the CPU (raw pointers, no torch headers; the host code
// is dense_row_norm_cpu.cpp and dora_cpu.cpp): ||W[o] + scale (B A)[o]|| for a tile of kNormRows
// rows x 32 columns of a dense or an NF4 W at a time, W + scale B A formed in registers and never
// stored. A is repacked per 32-column run in the order the tile reads W's run as two 16-lane halves:
// dense, columns 0-15 then 16-31; NF4, the even columns then the odd ones (the high and low nibbles
// of the run's 16 bytes).
#pragma once

#include <cstdint>

#include "dora/dora_math.h"
#include "nf4/cpu/kernels.h"

namespace peftx {
namespace dora {
namespace cpu {

// Rows of W per tile.
constexpr int64_t kNormRows = 4;
// Ranks per pass over a tile's run; the coefficient rows and packed A are padded to a multiple.
constexpr int64_t kNormRankGroup = 4;
inline int64_t norm_rank_padded(int64_t r) { return (r + kNormRankGroup - 1) / kNormRankGroup * kNormRankGroup; }

// c[o * rp + rr] = scale * B[o, rr] (rp = norm_rank_padded(r), zero past r): the rows' coefficients,
// for B [rows, r] fp32.
inline void norm_coefficients(const float* B, int64_t rows, int64_t r, float scale, float* c) {
  const int64_t rp = norm_rank_padded(r);
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t rr = 0; rr < rp; ++rr) c[o * rp + rr] = rr < r ? scale * B[o * r + rr] : 0.0f;
}

// A [r, cols] fp32 packed: per 32-column run c, per rank rr < rp, its 32 values in the tile's order
// (even_odd: the NF4 order), Ap[(c * rp + rr) * 32 + ...], zero past r and past cols;
// norm_packed_a_size(r, cols) floats.
inline int64_t norm_packed_a_size(int64_t r, int64_t cols) { return (cols + 31) / 32 * norm_rank_padded(r) * 32; }
void pack_norm_a(const float* A, int64_t r, int64_t cols, bool even_odd, float* Ap);

// norm[i] = ||W[i] + sum_rr c[i * rp + rr] A[rr]||_2 for the rows i < nrows (<= kNormRows) of W
// [nrows, cols] (row-major, dt), A packed by pack_norm_a(even_odd = false), c from norm_coefficients
// (rp per row). fp32 sums in an order of their own.
void dense_row_norm_rows(DenseDt dt, const void* W, int64_t nrows, int64_t cols, const float* Ap, int64_t r,
                         const float* c, float* norm);

// The same for rows o0 .. o0 + nrows - 1 of an NF4 W (dequant(W)), A packed with even_odd = true.
// Requires w.cols % 32 == 0 and w.blocksize % 32 == 0: a run lies in one block and starts on a byte.
void nf4_row_norm_rows(const nf4::cpu::Weight4& w, int64_t o0, int64_t nrows, const float* Ap, int64_t r,
                       const float* c, float* norm);

}  // namespace cpu
}  // namespace dora
}  // namespace peftx
