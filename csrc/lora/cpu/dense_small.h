// Few-token products of a dense LoRA base weight on AVX-512 CPUs (raw pointers, no torch headers):
// the frozen base's y = x W^T and dx = g W for up to a few dozen tokens, where the CPU BLAS runs far
// below memory bandwidth (4096 x 4096 bf16 at 1 token: 1.2 ms forward, 2.4 ms for g W, against
// 0.5 ms to stream the weight once). fp32 uses FMA, bf16 vdpbf16ps (CPUs with AVX-512 BF16); all
// sums in fp32, written as fp32 for the caller to round once.
#pragma once

#include <cstdint>

namespace peftx {
namespace lora {
namespace cpu {

// y[m * ldy + n] = sum_k x[m * K + k] W[n * K + k] for m < M, n in [n0, n1); K % 32 == 0, M <= 32.
void dense_rows_f32(const float* w, const float* x, int64_t M, int64_t K, int64_t n0, int64_t n1, float* y,
                    int64_t ldy);
void dense_rows_bf16(const uint16_t* w, const uint16_t* x, int64_t M, int64_t K, int64_t n0, int64_t n1, float* y,
                     int64_t ldy);

// out[m * K + k] = sum_n g[m * ldg + n] W[n * K + k] for m < M, k in [c0, c1).
// fp32: c0, c1 multiples of 64. bf16: multiples of 128, ldg even and g's columns past N zero.
void dense_t_f32(const float* w, const float* g, int64_t ldg, int64_t M, int64_t N, int64_t K, int64_t c0, int64_t c1,
                 float* out);
void dense_t_bf16(const uint16_t* w, const uint16_t* g, int64_t ldg, int64_t M, int64_t N, int64_t K, int64_t c0,
                  int64_t c1, float* out);

}  // namespace cpu
}  // namespace lora
}  // namespace peftx
