// The mixed-adapter LoRA term for bf16 rows on AVX-512 BF16 CPUs (raw pointers, no torch headers):
// for up to 4 rows of one adapter, y[m] = base[m] + s * bf16(x[m] A^T) B^T with vdpbf16ps. u is rounded to
// bf16 as the 16-bit GEMM path rounds it; the product u B^T is summed in fp32 and y rounded once.
#pragma once

#include <cstdint>

namespace peftx {
namespace lora {
namespace cpu {

// rows[0 .. nrows) (nrows <= 4) index x [*, K], base and y [*, N] (base may be y); A [R, K] bf16; BTp [(R + 1) / 2, N] dwords,
// BTp[j][n] = (B[n, 2 j], B[n, 2 j + 1]) (0 past R). K % 32 == 0, N % 32 == 0.
void multi_rows_bf16(const uint16_t* x, int64_t K, const int64_t* rows, int nrows, const uint16_t* A, int64_t R,
                     const uint32_t* BTp, int64_t N, float s, const uint16_t* base, uint16_t* y);

}  // namespace cpu
}  // namespace lora
}  // namespace peftx
