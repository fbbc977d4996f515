// CPU kernels of the NF4 ops: argument checks, allocation, threading (at::parallel_for, so
// torch.set_num_threads is obeyed) and the GEMV / tiled-GEMM split of the products. The loops
// themselves are the kernel table of the CPU's instruction set (cpu/isa.h: AVX-512, AVX2 or
// scalar, PEFTX_CPU_ISA forces one), each reproducing nf4_math.h's per-element definitions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/dispatch.h"
#include "common/huge_alloc.h"
#include "common/huge_pages.h"
#include "common/thread_scratch.h"
#include "nf4/cpu/isa.h"
#include "nf4/cpu/plan.h"
#include "nf4/nf4_checks.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace {

constexpr const char* kQuantize = "nf4_quantize";
constexpr const char* kDequantize = "nf4_dequantize";
constexpr const char* kMatmul = "nf4_matmul";
constexpr const char* kMatmulT = "nf4_matmul_t";

void check_finite_absmax(const char* op, const at::Tensor& absmax) {
  TORCH_CHECK(at::isfinite(absmax).all().item<bool>(), op,
              ": weight contains NaN or inf (block ", at::logical_not(at::isfinite(absmax)).nonzero()[0].item<int64_t>(),
              "); NF4 cannot represent them");
}

cpu::Dt to_dt(at::ScalarType t) {
  return t == at::kFloat ? cpu::Dt::kF32 : t == at::kBFloat16 ? cpu::Dt::kBF16 : cpu::Dt::kF16;
}

// Elements per parallel task: enough work to amortise a task, small enough to balance threads.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements_per_item, 1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& weight, int64_t blocksize) {
  check_blocksize(kQuantize, blocksize);
  PEFTX_CHECK_DTYPE_FLOAT(kQuantize, "weight", weight);
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.numel();
  const int64_t blocks = num_blocks(n, blocksize);
  // The packed codes outlive the call (the layer's weight): 2 MiB pages, see common/huge_alloc.h.
  at::Tensor packed = empty_huge_pages({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, w.options().dtype(at::kFloat));
  uint8_t* p = packed.data_ptr<uint8_t>();
  float* a = absmax.data_ptr<float>();
  const cpu::Kernels& kt = cpu::active_kernels();
  const cpu::Dt dt = to_dt(w.scalar_type());
  const void* src = w.const_data_ptr();
  at::parallel_for(0, blocks, grain(blocksize), [&](int64_t b0, int64_t b1) {
    kt.quantize_blocks(dt, src, n, blocksize, b0, b1, p, a);
  });
  if (n > 0) check_finite_absmax(kQuantize, absmax);
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                              int64_t blocksize, c10::SymIntArrayRef shape_sym, at::ScalarType dtype) {
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_sym);
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, kDequantize, ": shape must be non-negative, got ", shape);
    n *= s;
  }
  check_state(kDequantize, packed, absmax, code, blocksize, n);
  const at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  PEFTX_CHECK_DTYPE_FLOAT(kDequantize, "dtype", out);
  const cpu::Kernels& kt = cpu::active_kernels();
  const cpu::Weight4 wv{pk.const_data_ptr<uint8_t>(), am.const_data_ptr<float>(), cd.const_data_ptr<float>(),
                        blocksize, 1, n};
  const cpu::Dt dt = to_dt(dtype);
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t esize = out.element_size();
  advise_huge_pages(dst, static_cast<size_t>(n * esize));
  // Tasks own whole bytes (pairs of elements); decode takes any range.
  at::parallel_for(0, (n + 1) / 2, grain(2), [&](int64_t i0, int64_t i1) {
    kt.decode(wv, 2 * i0, std::min(n, 2 * i1), dt, dst + 2 * i0 * esize);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_double_quantize_cpu(const at::Tensor& absmax,
                                                                      const at::Tensor& code,
                                                                      int64_t blocksize) {
  check_double_quantize(absmax, code, blocksize);
  // bitsandbytes: offset = absmax.mean(); quantize_blockwise(absmax - offset). The same torch ops
  // give the same fp32 offset and differences.
  at::Tensor offset = absmax.mean();
  const at::Tensor centered = (absmax - offset).contiguous();
  const at::Tensor cd = code.contiguous();
  const int64_t n = centered.numel();
  const int64_t blocks = num_blocks(n, blocksize);
  at::Tensor q = at::empty({n}, absmax.options().dtype(at::kByte));
  at::Tensor nested = at::empty({blocks}, absmax.options());
  const float* x = centered.const_data_ptr<float>();
  const float* c = cd.const_data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* np = nested.data_ptr<float>();
  const cpu::Kernels& kt = cpu::active_kernels();
  at::parallel_for(0, blocks, grain(blocksize * 16), [&](int64_t b0, int64_t b1) {
    kt.double_quantize_blocks(x, n, blocksize, c, b0, b1, qp, np);
  });
  return {q, nested, offset};
}

void nf4_double_dequantize_into_cpu(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                    const at::Tensor& code, const at::Tensor& offset, int64_t blocksize,
                                    const at::Tensor& out) {
  check_double_dequantize(qabsmax, nested_absmax, code, offset, blocksize);
  check_double_dequantize_out(qabsmax, out);
  const int64_t n = qabsmax.numel();
  const at::Tensor q = qabsmax.contiguous(), na = nested_absmax.contiguous(), cd = code.contiguous();
  const float off = offset.item<float>();
  const uint8_t* qp = q.const_data_ptr<uint8_t>();
  const float* np = na.const_data_ptr<float>();
  const float* c = cd.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const cpu::Kernels& kt = cpu::active_kernels();
  at::parallel_for(0, n, grain(1), [&](int64_t i0, int64_t i1) {
    kt.double_dequantize(qp, np, c, blocksize, off, i0, i1, o);
  });
}

at::Tensor nf4_double_dequantize_cpu(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                     const at::Tensor& code, const at::Tensor& offset,
                                     int64_t blocksize) {
  check_double_dequantize(qabsmax, nested_absmax, code, offset, blocksize);
  at::Tensor out = at::empty({qabsmax.numel()}, nested_absmax.options());
  nf4_double_dequantize_into_cpu(qabsmax, nested_absmax, code, offset, blocksize, out);
  return out;
}

namespace {

cpu::Weight4 weight_view(const at::Tensor& pk, const at::Tensor& am, const at::Tensor& cd, int64_t blocksize,
                         int64_t rows, int64_t cols) {
  return {pk.const_data_ptr<uint8_t>(), am.const_data_ptr<float>(), cd.const_data_ptr<float>(), blocksize, rows, cols};
}

template <typename T>
void store_row_results(const float* res, int64_t tokens, int64_t o, const float* bias, T* y, int64_t ldy) {
  for (int64_t m = 0; m < tokens; ++m) store(y + m * ldy + o, bias ? add_rn(res[m], bias[o]) : res[m]);
}

// y = x W^T (+ bias) for few tokens: x converted once, W decoded in registers row by row, rows
// split over threads. Shapes the fused kernels do not take (cols % 32 != 0) decode each row into
// a cols-long fp32 buffer and dot it with every token.
void gemv(const cpu::Kernels& kt, const cpu::Weight4& w, const at::Tensor& x2, const at::Tensor& bias_f,
          at::Tensor& out) {
  const int64_t M = x2.size(0), N = w.rows, K = w.cols;
  const float* bias = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  const cpu::Dt out_dt = to_dt(out.scalar_type());
  void* y = out.data_ptr();
  const bool bf16 = x2.scalar_type() == at::kBFloat16 && kt.gemv_rows_bf16 != nullptr;
  const cpu::GemvRowsFn rows_fn = bf16 ? kt.gemv_rows_bf16 : kt.gemv_rows_f32;
  if (rows_fn != nullptr && K % 32 == 0) {
    const int64_t chunk = bf16 ? kt.gemv_chunk_bf16 : kt.gemv_chunk_f32;
    const int64_t stride = cpu::gemv_x_stride(K, chunk);
    at::Tensor xp = at::empty({M * stride}, x2.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
    cpu::gemv_pack_x(x2.const_data_ptr(), to_dt(x2.scalar_type()), M, K, K, chunk, bf16, xp.data_ptr());
    const cpu::GemvX xv{xp.const_data_ptr(), M, stride, bf16};
    at::parallel_for(0, N, grain(K), [&](int64_t o0, int64_t o1) { rows_fn(w, xv, o0, o1, bias, out_dt, y, N); });
    return;
  }
  const at::Tensor xf = x2.to(at::kFloat).contiguous();
  const float* xp = xf.const_data_ptr<float>();
  at::parallel_for(0, N, grain(K), [&](int64_t o0, int64_t o1) {
    std::vector<float> row(K), res(M);
    for (int64_t o = o0; o < o1; ++o) {
      kt.decode(w, o * K, o * K + K, cpu::Dt::kF32, row.data());
      for (int64_t m = 0; m < M; ++m) res[m] = kt.dot(xp + m * K, row.data(), K);
      dispatch_float(out.scalar_type(), kMatmul, [&](auto tag) {
        using T = typename decltype(tag)::type;
        store_row_results(res.data(), M, o, bias, static_cast<T*>(y), N);
      });
    }
  });
}

// Decodes rows [r0, r1) of W, columns [k0, k1), into tile rows 0.. (row stride ld), in dt.
void decode_tile(const cpu::Kernels& kt, const cpu::Weight4& w, int64_t r0, int64_t r1, int64_t k0, int64_t k1,
                 at::Tensor& tile, int64_t ld) {
  const cpu::Dt dt = to_dt(tile.scalar_type());
  char* base = static_cast<char*>(tile.data_ptr());
  const int64_t esize = tile.element_size();
  at::parallel_for(r0, r1, grain(k1 - k0), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) kt.decode(w, r * w.cols + k0, r * w.cols + k1, dt, base + (r - r0) * ld * esize);
  });
}

}  // namespace

at::Tensor nf4_matmul_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize, int64_t out_features,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(out_features >= 0, kMatmul, ": out_features must be non-negative, got ", out_features);
  const int64_t in_features = x.dim() >= 1 ? x.size(-1) : 0;
  const at::Tensor x2 = check_matmul_input(kMatmul, "x", x, in_features, packed);
  check_state(kMatmul, packed, absmax, code, blocksize, out_features * in_features);
  check_bias(kMatmul, bias, out_features, x);
  const int64_t M = x2.size(0), N = out_features, K = in_features;
  const at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  const cpu::Weight4 w = weight_view(pk, am, cd, blocksize, N, K);
  const cpu::Kernels& kt = cpu::active_kernels();
  at::Tensor out = at::empty({M, N}, x2.options());
  if (M == 0 || N == 0 || K == 0) {
    out.zero_();
    if (bias.has_value() && M > 0) out.add_(bias->to(out.scalar_type()));
  } else if (kt.gemm_rows_f32 != nullptr && K % 128 == 0 && x2.scalar_type() != at::kBFloat16) {
    // fp32 / fp16 x, any number of tokens: slabs of x laid out in the decode's lane order (fp32, in
    // this thread's scratch: at most kTileBytes, as the tiles below), each times W decoded in
    // registers in 4 rows x 4 tokens register tiles.
    const int64_t slab = cpu::rows_kernel_slab_tokens(K);
    at::Tensor xp = thread_scratch(kNf4TileSlot, {std::min(M, slab), K}, x2.options().dtype(at::kFloat));
    float* xpp = xp.data_ptr<float>();
    const cpu::Dt in_dt = to_dt(x2.scalar_type()), out_dt = to_dt(out.scalar_type());
    const char* xin = static_cast<const char*>(x2.const_data_ptr());
    char* yp = static_cast<char*>(out.data_ptr());
    const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bp = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += slab) {
      const int64_t ms = std::min(slab, M - m0);
      const char* xm = xin + m0 * K * static_cast<int64_t>(x2.element_size());
      at::parallel_for(0, ms, 1, [&](int64_t t0, int64_t t1) { kt.perm_x_f32(xm, in_dt, K, t0, t1, K, xpp); });
      char* ym = yp + m0 * N * static_cast<int64_t>(out.element_size());
      at::parallel_for(0, (N + 3) / 4, 1, [&](int64_t g0, int64_t g1) {
        kt.gemm_rows_f32(w, xpp, ms, g0 * 4, std::min(N, g1 * 4), bp, out_dt, ym, N);
      });
    }
  } else if (M <= cpu::gemv_tokens(x2.scalar_type() == at::kBFloat16,
                                    kt.gemv_rows_bf16 != nullptr && blocksize >= 64 && K % 64 == 0)) {
    const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    gemv(kt, w, x2, bias_f, out);
  } else {
    // y[:, r0:r1] = x @ tile^T with the tile decoded in x's dtype (what dequantize returns), one
    // BLAS call per tile writing straight into the output's column slice.
    // fp16 tiles compute in fp32: the CPU BLAS has no fast fp16 GEMM (17 tokens took 12 ms vs 2.6).
    const bool via_f32 = x2.scalar_type() == at::kHalf;
    const at::Tensor xc = via_f32 ? x2.to(at::kFloat) : x2;
    at::Tensor outc = via_f32 ? at::empty({M, N}, xc.options()) : out;
    const int64_t tr = cpu::gemm_tile_rows(N, K, xc.element_size());
    // The tile in this thread's scratch: a fresh 2 MiB tensor per call came from fresh pages whenever
    // glibc had returned the last one (about 500 faults a tile; up to 6 ms per QLoRA step at 512 tokens).
    at::Tensor tile = thread_scratch(kNf4TileSlot, {tr, K}, xc.options());
    for (int64_t r0 = 0; r0 < N; r0 += tr) {
      const int64_t r1 = std::min(N, r0 + tr);
      decode_tile(kt, w, r0, r1, 0, K, tile, K);
      at::Tensor slice = outc.narrow(1, r0, r1 - r0);
      at::mm_out(slice, xc, tile.narrow(0, 0, r1 - r0).t());
    }
    if (via_f32) out.copy_(outc);
    if (bias.has_value()) out.add_(bias->to(out.scalar_type()));
  }
  return out.reshape(leading_shape(x, N));
}

at::Tensor nf4_matmul_t_cpu(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                            const at::Tensor& code, int64_t blocksize, int64_t in_features) {
  TORCH_CHECK(in_features >= 0, kMatmulT, ": in_features must be non-negative, got ", in_features);
  const int64_t out_features = grad.dim() >= 1 ? grad.size(-1) : 0;
  const at::Tensor g2 = check_matmul_input(kMatmulT, "grad", grad, out_features, packed);
  check_state(kMatmulT, packed, absmax, code, blocksize, out_features * in_features);
  const int64_t M = g2.size(0), N = out_features, K = in_features;
  const at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  const cpu::Weight4 w = weight_view(pk, am, cd, blocksize, N, K);
  const cpu::Kernels& kt = cpu::active_kernels();
  if (M == 0 || N == 0 || K == 0) return at::zeros(leading_shape(grad, K), grad.options());
  if (kt.gemv_t_cols != nullptr && K % 128 == 0 && g2.scalar_type() != at::kBFloat16) {
    // fp32 / fp16 g: dx = g W in fp32 (the fp32 weight), each task's 128-feature chunks of dx in
    // registers (gemv_t_cols), for groups of up to kGemvTColsGroupTokens tokens, written straight
    // in g's dtype. (bf16 g multiplies by the bf16 weight nf4_dequantize gives, below.)
    const at::Tensor gf = g2.to(at::kFloat).contiguous();
    at::Tensor out = at::empty({M, K}, g2.options());
    const float* gp = gf.const_data_ptr<float>();
    char* op = static_cast<char*>(out.data_ptr());
    const cpu::Dt dt = to_dt(out.scalar_type());
    const int64_t chunks = K / 128, group = cpu::kGemvTColsGroupTokens;
    const int64_t groups = (M + group - 1) / group;
    at::parallel_for(0, groups * chunks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1;) {
        const int64_t m0 = i / chunks * group, c0 = i % chunks, c1 = std::min(chunks, c0 + (i1 - i));
        kt.gemv_t_cols(w, gp + m0 * N, N, std::min(group, M - m0), c0 * 128, c1 * 128, dt,
                       op + m0 * K * static_cast<int64_t>(out.element_size()), K);
        i += c1 - c0;
      }
    });
    return out.reshape(leading_shape(grad, K));
  }
  if (g2.scalar_type() == at::kBFloat16 && kt.gemv_t_bf16 != nullptr && blocksize >= 64 && K % 128 == 0 &&
      M <= cpu::kGemvTBf16MaxTokens) {
    // dx = g W with vdpbf16ps over pairs of W's rows (g padded to an even number of columns), each
    // task owning whole 128-feature chunks of dx (fp32, natural order).
    const at::Tensor gp = N % 2 == 0 ? g2 : at::constant_pad_nd(g2, {0, 1});
    const int64_t ldg = gp.size(1);
    at::Tensor acc = at::empty({M, K}, g2.options().dtype(at::kFloat));
    const uint16_t* gptr = static_cast<const uint16_t*>(gp.const_data_ptr());
    float* ap = acc.data_ptr<float>();
    at::parallel_for(0, K / 128, 1, [&](int64_t c0, int64_t c1) { kt.gemv_t_bf16(w, gptr, ldg, M, c0 * 128, c1 * 128, ap); });
    return acc.to(grad.scalar_type()).reshape(leading_shape(grad, K));
  }
  const int64_t gemv_t_max = cpu::gemv_t_tokens(g2.scalar_type() == at::kBFloat16);
  if (M <= gemv_t_max && kt.gemv_t_rows != nullptr && K % 32 == 0) {
    // dx = g W: rows split over tasks, each accumulating a private dx (fp32, chunk-32 layout) with
    // W decoded in registers; then the partial sums are added and put in natural order.
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 16));
    at::Tensor part = at::zeros({tasks, M, K}, g2.options().dtype(at::kFloat));
    const at::Tensor gf = g2.to(at::kFloat).contiguous();
    const float* gp = gf.const_data_ptr<float>();
    float* pp = part.data_ptr<float>();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        kt.gemv_t_rows(w, gp, N, M, N * t / tasks, N * (t + 1) / tasks, pp + t * M * K);
    });
    const at::Tensor acc = (tasks > 1 ? part.sum(0) : part[0]).view({M, K / 32, 2, 16}).transpose(2, 3).reshape({M, K});
    return acc.to(grad.scalar_type()).reshape(leading_shape(grad, K));
  }
  if (M <= gemv_t_max) {
    // dx[m, k0:k1] = sum_o g[m, o] W[o, k0:k1]: each task owns column chunks of dx (fp32); for each
    // chunk it decodes four rows at a time into an L1-sized buffer and accumulates them with one
    // pass over the chunk of dx.
    at::Tensor acc = at::zeros({M, K}, g2.options().dtype(at::kFloat));
    const at::Tensor gf = g2.to(at::kFloat).contiguous();
    const float* gp = gf.const_data_ptr<float>();
    float* dp = acc.data_ptr<float>();
    constexpr int64_t kCols = 512;
    at::parallel_for(0, (K + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> rows(4 * kCols);
      const float* v[4] = {rows.data(), rows.data() + kCols, rows.data() + 2 * kCols, rows.data() + 3 * kCols};
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k0 = c * kCols, k1 = std::min(K, k0 + kCols), width = k1 - k0;
        for (int64_t o = 0; o < N; o += 4) {
          const int nv = static_cast<int>(std::min<int64_t>(4, N - o));
          for (int r = 0; r < nv; ++r)
            kt.decode(w, (o + r) * K + k0, (o + r) * K + k1, cpu::Dt::kF32, rows.data() + r * kCols);
          for (int64_t m = 0; m < M; ++m) kt.axpy(nv, gp + m * N + o, v, width, dp + m * K + k0);
        }
      }
    });
    return acc.to(grad.scalar_type()).reshape(leading_shape(grad, K));
  }
  // dx[:, k0:k1] = g @ W[:, k0:k1]: column tiles decoded in g's dtype, the full reduction over
  // out_features in one BLAS call per tile.
  // fp16 tiles compute in fp32 (no fast fp16 GEMM on the CPU: 17 tokens took 360 ms).
  const at::Tensor gc = g2.scalar_type() == at::kHalf ? g2.to(at::kFloat) : g2;
  at::Tensor out = at::empty({M, K}, gc.options());
  const int64_t tc = cpu::gemm_tile_cols(N, K, gc.element_size());
  at::Tensor tile = thread_scratch(kNf4TileSlot, {N, tc}, gc.options());  // as nf4_matmul's tile
  for (int64_t k0 = 0; k0 < K; k0 += tc) {
    const int64_t k1 = std::min(K, k0 + tc);
    decode_tile(kt, w, 0, N, k0, k1, tile, tc);
    at::Tensor slice = out.narrow(1, k0, k1 - k0);
    at::mm_out(slice, gc, tile.narrow(1, 0, k1 - k0));
  }
  return out.to(grad.scalar_type()).reshape(leading_shape(grad, K));
}

TORCH_LIBRARY_IMPL(peftx, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("nf4_double_quantize", &nf4_double_quantize_cpu);
  m.impl("nf4_double_dequantize", &nf4_double_dequantize_cpu);
  m.impl("nf4_double_dequantize_into", &nf4_double_dequantize_into_cpu);
  m.impl("nf4_matmul", &nf4_matmul_cpu);
  m.impl("nf4_matmul_t", &nf4_matmul_t_cpu);
}

}  // namespace nf4
}  // namespace peftx
