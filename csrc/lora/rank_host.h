// What the CPU rank-r kernels' host code (rank_bf16_cpu.cpp, rank_f32_cpu.cpp) shares: per-thread
// scratch (common/scratch_vector.h), the backward's column chunk width, and the dB pass's g B outputs
// and partial sums.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/scratch_vector.h"

namespace peftx {
namespace lora {

// Columns per task of the backward's column-chunked pass: the task's packed copy of x (M x cols
// elements of elem bytes) stays within half of a 1 MiB L2, at least one task per thread, at least
// 128 columns (the mask is drawn 128 elements per step and row), at most max_cols, a multiple of 16.
inline int64_t adjoint_chunk_cols(int64_t M, int64_t K, int64_t elem, int64_t max_cols) {
  constexpr int64_t kPackBytes = int64_t(1) << 19;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_cache = kPackBytes / std::max<int64_t>(M * elem, 1);
  const int64_t by_threads = (K + threads - 1) / threads;
  return std::min<int64_t>(max_cols, std::max<int64_t>(128, (std::min(by_cache, by_threads) + 15) / 16 * 16));
}

// Where a host's adjoint() also computes gBs = (x B) s in its dB pass (x = g): B [N, R] and the
// output.
struct GbsFused {
  const at::Tensor& B;
  double s;
  at::Tensor& gBs;
};

// g B's fp32 partial sums in the dB pass: one zeroed [M, 16] slice per thread (each thread's over its
// column chunks), added in thread order after the parallel region.
struct ThreadPartials {
  float* acc = nullptr;  // [threads, M, 16]
  int64_t threads = 1;
  int64_t M = 0;
  // The calling worker's slice.
  float* mine() const { return acc + std::min<int64_t>(at::get_thread_num(), threads - 1) * M * 16; }
};

inline ThreadPartials thread_partials(int64_t M) {
  thread_local std::vector<float> buf;
  ThreadPartials p;
  p.threads = std::max<int64_t>(1, at::get_num_threads());
  p.M = M;
  p.acc = scratch(buf, static_cast<size_t>(p.threads * M * 16));
  std::fill(p.acc, p.acc + p.threads * M * 16, 0.0f);
  return p;
}

}  // namespace lora
}  // namespace peftx
