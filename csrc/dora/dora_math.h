// DoRA's weight norm over a 4-bit base: the per-row (per output feature) L2 norm of
//   V = dequant(W) + scale * B A,   W [rows = out, cols = in] NF4 (nf4_math.h layout),
//   A [r, cols] fp32 row-major, B [rows, r] fp32 row-major,
//   norm[o] = sqrt(sum_k V[o, k]^2),
// computed without materialising V: each element is decoded, the rank-r term added, and squared
// in registers. The per-lane work below is shared by the CUDA kernel (one warp per row), its CPU
// emulation and the pure-torch reference's definition (peftx/ops/reference.py).
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace dora {

// V[o, k] for one element: decode(o * cols + k) + sum_rr (scale * B[o, rr]) * A[rr, k].
PEFTX_HD float row_norm_element(int64_t o, int64_t k, const uint8_t* __restrict__ packed,
                                const float* __restrict__ absmax, const float* __restrict__ code,
                                int64_t blocksize, int64_t cols, const float* __restrict__ A,
                                const float* __restrict__ B, int64_t r, float scale) {
  float low_rank = 0.0f;
  for (int64_t rr = 0; rr < r; ++rr) low_rank += mul_rn(scale, B[o * r + rr]) * A[rr * cols + k];
  return nf4::decode(o * cols + k, packed, absmax, code, blocksize) + low_rank;
}

// Lane `lane` of `lanes` (a warp) returns its partial sum of squares over k = lane, lane + lanes, ...
// of row o; the warp combines the partials in nf4::warp_tree_sum's order and takes the sqrt.
PEFTX_HD float row_norm_lane_partial(int64_t o, int lane, int lanes, const uint8_t* __restrict__ packed,
                                     const float* __restrict__ absmax, const float* __restrict__ code,
                                     int64_t blocksize, int64_t cols, const float* __restrict__ A,
                                     const float* __restrict__ B, int64_t r, float scale) {
  float acc = 0.0f;
  for (int64_t k = lane; k < cols; k += lanes) {
    const float v = row_norm_element(o, k, packed, absmax, code, blocksize, cols, A, B, r, scale);
    acc += v * v;
  }
  return acc;
}

}  // namespace dora
}  // namespace peftx
