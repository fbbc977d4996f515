// The CPU kernel table of the NF4 ops: one implementation per instruction set (scalar, AVX2,
// AVX-512), each a set of raw-pointer loops over an index range. Threading, tiling, allocation and
// argument checks stay in nf4_cpu.cpp (ATen); these files include no torch header, so the SIMD code
// is compiled only inside functions marked with a target attribute (simd_*.h) and the library runs
// on CPUs without AVX-512.
#pragma once

#include <cstddef>
#include <cstdint>

namespace peftx {
namespace nf4 {
namespace cpu {

enum class Dt { kF32, kBF16, kF16 };

inline size_t dt_size(Dt d) { return d == Dt::kF32 ? 4 : 2; }

// A 4-bit weight W [rows, cols] (flattened blockwise, see nf4_math.h): element j decodes to
// code[nibble(j)] * absmax[j / blocksize].
struct Weight4 {
  const uint8_t* packed;
  const float* absmax;
  const float* code;  // 16 fp32
  int64_t blocksize;
  int64_t rows, cols;
};

// Activations of the GEMV kernels, converted once per call into the kernel's chunk layout: per
// token, for each chunk of `chunk` consecutive features, the even-indexed features then the odd
// ones (the order in which a chunk's packed bytes decode: high nibbles, then low nibbles), zero
// padded to a whole number of chunks. `bf16` selects bf16 storage (the AVX-512 BF16 dot-product
// kernel) over fp32.
struct GemvX {
  const void* data;
  int64_t tokens;
  int64_t stride;  // elements per token (cols rounded up to the chunk)
  bool bf16;
};

using GemvRowsFn = void (*)(const Weight4& w, const GemvX& x, int64_t o0, int64_t o1, const float* bias,
                           Dt out_dt, void* y, int64_t ldy);

struct Kernels {
  const char* name;
  // Quantizes blocks [b0, b1) of w (n elements, dtype dt) into packed / absmax, byte-equal to
  // nf4_math.h's quantize_block. NaN inputs leave a NaN absmax.
  void (*quantize_blocks)(Dt dt, const void* w, int64_t n, int64_t blocksize, int64_t b0, int64_t b1,
                          uint8_t* packed, float* absmax);
  // 8-bit blockwise quantization of x (n fp32) with the sorted 256-entry code: blocks [b0, b1),
  // byte-equal to nf4_math.h's quantize8_block.
  void (*double_quantize_blocks)(const float* x, int64_t n, int64_t blocksize, const float* code, int64_t b0,
                                 int64_t b1, uint8_t* q, float* absmax);
  // out[i] = decode(j0 + i) rounded to dt, i in [0, j1 - j0): exactly nf4_math.h's decode + store.
  void (*decode)(const Weight4& w, int64_t j0, int64_t j1, Dt dt, void* out);
  // out[i] = code[q[i]] * nested[i / blocksize] + offset (two roundings), i in [i0, i1).
  void (*double_dequantize)(const uint8_t* q, const float* nested, const float* code, int64_t blocksize,
                            float offset, int64_t i0, int64_t i1, float* out);
  // y[m * ldy + o] = sum_k x[m, k] W[o, k] (+ bias[o]) rounded to out_dt, o in [o0, o1), for
  // W.cols % 32 == 0, x in the GemvX layout of the given chunk: fp32 activations, and bf16 ones
  // (nullptr where the CPU has no bf16 dot product; bf16 input then takes the fp32 kernel). Other
  // shapes, and tables without a kernel, decode each row with `decode` and call `dot`.
  GemvRowsFn gemv_rows_f32;
  int64_t gemv_chunk_f32;
  GemvRowsFn gemv_rows_bf16;
  int64_t gemv_chunk_bf16;
  // acc[m, :] += sum_{o in [o0, o1)} g[m * ldg + o] W[o, :] for m < tokens, acc [tokens, cols] fp32
  // in the GemvX chunk-32 layout; cols % 32 == 0 (nullptr: decode + axpy instead).
  void (*gemv_t_rows)(const Weight4& w, const float* g, int64_t ldg, int64_t tokens, int64_t o0, int64_t o1,
                      float* acc);
  // out[m * cols + k] = sum_o g[m * ldg + o] W[o, k] for m < tokens, k in [c0, c1), with g bf16
  // [tokens, ldg] (ldg even, >= rows, columns past rows zero) and fp32 out; blocksize >= 64,
  // cols % 128 == 0, c0 and c1 multiples of 128 (nullptr where the CPU has no bf16 dot product).
  void (*gemv_t_bf16)(const Weight4& w, const uint16_t* g, int64_t ldg, int64_t tokens, int64_t c0, int64_t c1,
                      float* out);
  // out[m * ldo + k] = sum_o g[m * ldg + o] W[o, k] rounded to out_dt for m < tokens, k in [c0, c1),
  // with g fp32 [tokens, ldg] and the sum in fp32 over the rows in order; cols % 128 == 0, c0 and c1
  // multiples of 128 (nullptr: the kernels above).
  void (*gemv_t_cols)(const Weight4& w, const float* g, int64_t ldg, int64_t tokens, int64_t c0, int64_t c1,
                      Dt out_dt, void* out, int64_t ldo);
  // Many-token x W^T in fp32 (nullptr: tiles + BLAS): perm_x_f32 writes tokens [t0, t1) of x (dt,
  // row stride ldx) as fp32 in the kernel's lane order into out [tokens, cols]; gemm_rows_f32 then
  // gives y[m * ldy + o] = sum_k x[m, k] W[o, k] (+ bias[o]) rounded to out_dt for m < tokens, o in
  // [o0, o1), with W's fp32 weights code * absmax. cols % 128 == 0.
  void (*perm_x_f32)(const void* x, Dt dt, int64_t ldx, int64_t t0, int64_t t1, int64_t cols, float* out);
  void (*gemm_rows_f32)(const Weight4& w, const float* xp, int64_t tokens, int64_t o0, int64_t o1, const float* bias,
                        Dt out_dt, void* y, int64_t ldy);
  // dot(a, b) over n fp32, and acc[i] += sum_r c[r] * v[r][i] for r < nv (nv <= 4), i < n.
  float (*dot)(const float* a, const float* b, int64_t n);
  void (*axpy)(int nv, const float* c, const float* const* v, int64_t n, float* acc);
};

const Kernels& scalar_kernels();
const Kernels& avx2_kernels();
const Kernels& avx512_kernels();

// Elements per token of the GemvX layout: whole chunks, plus one more so that token rows are not
// a power-of-two apart (rows 2^k bytes apart share L1 sets; 4 tokens are read together).
inline int64_t gemv_x_stride(int64_t cols, int64_t chunk) { return (cols + chunk - 1) / chunk * chunk + chunk; }

// Writes x (tokens x cols, row stride ldx, dtype dt) in the GemvX layout of `chunk` into out.
void gemv_pack_x(const void* x, Dt dt, int64_t tokens, int64_t cols, int64_t ldx, int64_t chunk, bool bf16,
                 void* out);

}  // namespace cpu
}  // namespace nf4
}  // namespace peftx
