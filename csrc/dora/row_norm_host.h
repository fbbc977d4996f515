// What the two CPU row-norm hosts (dense_row_norm_cpu.cpp, dora_cpu.cpp) share on AVX-512: the
// rows' coefficients and the packed A (cpu/row_norm.h), built once per call, and the tiles of
// kNormRows rows split over threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dora/cpu/row_norm.h"

namespace peftx {
namespace dora {

// tile(o, n, Ap, c) for each tile of n <= kNormRows rows starting at row o, with A [r, cols] packed
// in the tile's column order (even_odd: the NF4 order) and c the tile's first row of coefficients
// (scale * B [rows, r]). About 2^15 elements of W per task at least.
template <typename Tile>
void for_each_norm_tile(int64_t rows, int64_t cols, const float* A, const float* B, int64_t r, double scale,
                        bool even_odd, Tile&& tile) {
  const int64_t rp = cpu::norm_rank_padded(r);
  std::vector<float> c(static_cast<size_t>(rows * rp));
  cpu::norm_coefficients(B, rows, r, static_cast<float>(scale), c.data());
  std::vector<float> ap(static_cast<size_t>(cpu::norm_packed_a_size(r, cols)));
  cpu::pack_norm_a(A, r, cols, even_odd, ap.data());
  const int64_t tiles = (rows + cpu::kNormRows - 1) / cpu::kNormRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cpu::kNormRows * cols, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = t * cpu::kNormRows;
      tile(o, std::min(cpu::kNormRows, rows - o), static_cast<const float*>(ap.data()),
           static_cast<const float*>(c.data() + o * rp));
    }
  });
}

}  // namespace dora
}  // namespace peftx
