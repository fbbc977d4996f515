// How the CPU products split their work: GEMV (decode in registers) for few tokens, and for more
// tokens a GEMM over decoded tiles of W whose size is a fixed byte budget, so the extra memory of
// nf4_matmul / nf4_matmul_t never grows with the weight (tests/ops/test_nf4_cpu_paths.py checks
// the budget and the measured peak).
#pragma once

#include <algorithm>
#include <cstdint>

namespace peftx {
namespace nf4 {
namespace cpu {

// fp32 / fp16 activations with cols % 128 == 0 on AVX-512 take the fp32 register-tile kernels at
// every token count instead (gemm_rows_f32 for x W^T, gemv_t_cols for g W): 4096 x 4096, 2 threads,
// x W^T at 1 / 8 / 16 / 17 / 64 / 512 tokens 0.18 / 0.74 / 1.5 / 1.7 / 6.1 / 50 ms, against
// 0.21 / 1.4 / 4.1 (GEMV) and 11.7 / 21 / 100 ms (fp32 tiles + BLAS). The limits below apply to
// bf16, to other shapes and to CPUs without AVX-512.
// Most tokens (rows of x or of grad) the GEMV kernels take: fp32 activations, and bf16 ones on the
// scaled-table kernel (blocksize >= 64, cols % 64 == 0; 8 tokens per pass over W).
constexpr int64_t kGemvMaxTokens = 16;
constexpr int64_t kGemvBf16MaxTokens = 20;
constexpr int64_t kGemvTMaxTokens = 16;
// Most tokens the bf16 transposed kernel (gemv_t_bf16) takes before decoded tiles + BLAS win.
constexpr int64_t kGemvTBf16MaxTokens = 64;
// The fp32 transposed kernel (gemv_t_cols) takes fp32 and fp16 grads at every token count (4096 x
// 4096, 2 threads: 0.25 / 0.8 / 5.8 / 45 ms at 2 / 8 / 64 / 512 tokens, against 0.8 / 5.5 / 15 / 92
// ms for the rows kernel or fp32 tiles + BLAS, whose fp32 GEMM runs at about 190 GFLOP/s here), in
// groups of this many tokens per task.
constexpr int64_t kGemvTColsGroupTokens = 24;

// Up to how many tokens the products use the GEMV kernels rather than decoded tiles + BLAS, by
// activation dtype. Crossovers measured on the 2-core AVX-512 machine, 4096 x 4096: for W x, bf16
// tiles (fast BLAS bf16 GEMM) win from about 10 tokens over the 4-token bf16 kernel and from about
// 20 over the scaled-table one (16 tokens: 1.8 vs 2.2 ms; 32: 3.6 vs 2.8 ms); fp32/fp16 tiles
// (fp16 runs through fp32) only past 16; for g W the fp32 transposed GEMV costs about 0.9 ms per
// token and a tiled pass 6-8 ms, while the bf16 row-pair kernel (gemv_t_bf16) takes 1.1 ms at 16
// tokens and 4.5 ms at 64, no slower than the tiles there.
inline int64_t gemv_tokens(bool is_bf16, bool scaled_bf16) {
  return is_bf16 ? (scaled_bf16 ? kGemvBf16MaxTokens : 10) : kGemvMaxTokens;
}
inline int64_t gemv_t_tokens(bool /*is_bf16*/) { return 8; }
// Bytes of one decoded tile (2 MiB: an L2's worth; a quarter of a 4096 x 4096 bf16 weight is 8 MiB).
constexpr int64_t kTileBytes = int64_t(2) << 20;

// Tokens per slab of the fp32 rows kernel (gemm_rows_f32): x's slab in fp32 fits kTileBytes (at
// least 32 tokens, one token block of the kernel).
inline int64_t rows_kernel_slab_tokens(int64_t cols) {
  return std::max<int64_t>(32, kTileBytes / std::max<int64_t>(cols * 4, 1) / 32 * 32);
}

// Rows of W per tile of nf4_matmul's GEMM path ([rows, cols] in elem-byte elements): a multiple
// of 16 where the budget allows; at least one row.
inline int64_t gemm_tile_rows(int64_t rows, int64_t cols, int64_t elem) {
  int64_t t = kTileBytes / std::max<int64_t>(cols * elem, 1);
  if (t >= 16) t -= t % 16;
  return std::clamp<int64_t>(t, 1, std::max<int64_t>(rows, 1));
}

// Columns of W per tile of nf4_matmul_t's GEMM path (a [rows, width] slice): a multiple of 64
// where the budget allows, at least 16 (so a very tall weight may exceed the budget: rows * 16).
inline int64_t gemm_tile_cols(int64_t rows, int64_t cols, int64_t elem) {
  int64_t t = kTileBytes / std::max<int64_t>(rows * elem, 1);
  if (t >= 64) t -= t % 64;
  return std::clamp<int64_t>(t, std::min<int64_t>(16, std::max<int64_t>(cols, 1)), std::max<int64_t>(cols, 1));
}

}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
