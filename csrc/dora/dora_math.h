// DoRA's weight norm: the per-row (per output feature) L2 norm of
//   V = W + scale * B A,   W [rows = out, cols = in], A [r, cols] fp32 row-major, B [rows, r] fp32,
//   norm[o] = sqrt(sum_k V[o, k]^2),
// with W stored as NF4 (nf4_math.h layout: dequant(W)) or dense (fp32 / fp16 / bf16), computed
// without materialising V: each element of W is read (or decoded), the rank-r term added, and
// squared in registers. The per-lane work below is shared by the CUDA kernels (one warp per row),
// their CPU emulation and the pure-torch references' definition (peftx/ops/reference.py).
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace dora {

// The storage type of a dense W.
enum class DenseDt { kF32, kF16, kBF16 };

// (scale B A)[o, k] = sum_rr (scale * B[o, rr]) * A[rr, k], in rr order.
PEFTX_HD float low_rank_element(int64_t o, int64_t k, int64_t cols, const float* __restrict__ A,
                                const float* __restrict__ B, int64_t r, float scale) {
  float low_rank = 0.0f;
  for (int64_t rr = 0; rr < r; ++rr) low_rank += mul_rn(scale, B[o * r + rr]) * A[rr * cols + k];
  return low_rank;
}

// V[o, k] for one element: decode(o * cols + k) + sum_rr (scale * B[o, rr]) * A[rr, k].
PEFTX_HD float row_norm_element(int64_t o, int64_t k, const uint8_t* __restrict__ packed,
                                const float* __restrict__ absmax, const float* __restrict__ code,
                                int64_t blocksize, int64_t cols, const float* __restrict__ A,
                                const float* __restrict__ B, int64_t r, float scale) {
  return nf4::decode(o * cols + k, packed, absmax, code, blocksize) + low_rank_element(o, k, cols, A, B, r, scale);
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

// row_norm_lane_partial over a dense W [rows, cols] of T (float, bf16_t or f16_t, widened exactly).
template <typename T>
PEFTX_HD float dense_row_norm_lane_partial(int64_t o, int lane, int lanes, const T* __restrict__ W, int64_t cols,
                                           const float* __restrict__ A, const float* __restrict__ B, int64_t r,
                                           float scale) {
  float acc = 0.0f;
  for (int64_t k = lane; k < cols; k += lanes) {
    const float v = to_float(W[o * cols + k]) + low_rank_element(o, k, cols, A, B, r, scale);
    acc += v * v;
  }
  return acc;
}

}  // namespace dora
}  // namespace peftx
