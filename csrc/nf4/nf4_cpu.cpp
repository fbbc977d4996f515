// CPU kernels of the NF4 ops. The per-block / per-byte work is the shared code in nf4_math.h (the
// same functions the CUDA kernels run per thread); the matrix products decode W a few rows at a
// time and never hold the whole dequantized weight.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/dispatch.h"
#include "nf4/nf4_checks.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace {

constexpr const char* kQuantize = "nf4_quantize";
constexpr const char* kDequantize = "nf4_dequantize";
constexpr const char* kMatmul = "nf4_matmul";
constexpr const char* kMatmulT = "nf4_matmul_t";

// Rows (of x or g) up to which the products decode W row by row into registers-sized buffers and
// dot directly; beyond it they decode row tiles and call torch's own GEMM.
constexpr int64_t kGemvMaxRows = 8;
// Elements of W decoded per tile in the GEMM path (1 Mi: 2-4 MiB, far below a quarter of any
// weight large enough for the tile to be smaller than the weight).
constexpr int64_t kTileElements = int64_t(1) << 20;

void check_finite_absmax(const char* op, const at::Tensor& absmax) {
  TORCH_CHECK(at::isfinite(absmax).all().item<bool>(), op,
              ": weight contains NaN or inf (block ", at::logical_not(at::isfinite(absmax)).nonzero()[0].item<int64_t>(),
              "); NF4 cannot represent them");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& weight, int64_t blocksize) {
  check_blocksize(kQuantize, blocksize);
  PEFTX_CHECK_DTYPE_FLOAT(kQuantize, "weight", weight);
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.numel();
  const int64_t blocks = num_blocks(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, w.options().dtype(at::kFloat));
  uint8_t* p = packed.data_ptr<uint8_t>();
  float* a = absmax.data_ptr<float>();
  dispatch_float(w.scalar_type(), kQuantize, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = reinterpret_cast<const T*>(w.const_data_ptr());
    at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) quantize_block(b, src, n, blocksize, p, a);
    });
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
  const int64_t bytes = (n + 1) / 2;
  dispatch_float(dtype, kDequantize, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = reinterpret_cast<T*>(out.data_ptr());
    const uint8_t* p = pk.const_data_ptr<uint8_t>();
    const float* a = am.const_data_ptr<float>();
    const float* c = cd.const_data_ptr<float>();
    at::parallel_for(0, bytes, 8192, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dequantize_byte(i, p, a, c, blocksize, n, dst);
    });
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
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) quantize8_block(b, x, n, blocksize, c, qp, np);
  });
  return {q, nested, offset};
}

at::Tensor nf4_double_dequantize_cpu(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                     const at::Tensor& code, const at::Tensor& offset,
                                     int64_t blocksize) {
  check_double_dequantize(qabsmax, nested_absmax, code, offset, blocksize);
  const int64_t n = qabsmax.numel();
  const at::Tensor q = qabsmax.contiguous(), na = nested_absmax.contiguous(), cd = code.contiguous();
  at::Tensor out = at::empty({n}, nested_absmax.options());
  const float off = offset.item<float>();
  const uint8_t* qp = q.const_data_ptr<uint8_t>();
  const float* np = na.const_data_ptr<float>();
  const float* c = cd.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = decode_absmax(i, qp, np, c, blocksize, off);
  });
  return out;
}

namespace {

// Decodes W[row, k0:k1] into fp32 dst. Walks block by block so the scale is read once per block.
void decode_row_range(int64_t row, int64_t k0, int64_t k1, int64_t cols, const uint8_t* packed,
                      const float* absmax, const float* code, int64_t blocksize, float* dst) {
  int64_t j = row * cols + k0;
  const int64_t end = row * cols + k1;
  while (j < end) {
    const int64_t block_end = std::min(end, (j / blocksize + 1) * blocksize);
    const float scale = absmax[j / blocksize];
    for (; j < block_end; ++j) {
      const uint8_t byte = packed[j >> 1];
      *dst++ = code[(j & 1) ? (byte & 0x0f) : (byte >> 4)] * scale;
    }
  }
}

// Decodes rows [r0, r1) of W into `tile` ([r1 - r0, cols], dtype of tile).
void decode_rows(int64_t r0, int64_t r1, int64_t cols, const uint8_t* packed, const float* absmax,
                 const float* code, int64_t blocksize, at::Tensor& tile) {
  dispatch_float(tile.scalar_type(), "nf4 decode", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = reinterpret_cast<T*>(tile.data_ptr());
    at::parallel_for(r0, r1, 1, [&](int64_t a, int64_t b) {
      std::vector<float> row(cols);
      for (int64_t r = a; r < b; ++r) {
        decode_row_range(r, 0, cols, cols, packed, absmax, code, blocksize, row.data());
        T* out = dst + (r - r0) * cols;
        for (int64_t k = 0; k < cols; ++k) store(out + k, row[k]);
      }
    });
  });
}

int64_t tile_rows(int64_t rows, int64_t cols) {
  const int64_t t = std::max<int64_t>(16, kTileElements / std::max<int64_t>(cols, 1));
  return std::min(rows, t);
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
  const uint8_t* p = pk.const_data_ptr<uint8_t>();
  const float* a = am.const_data_ptr<float>();
  const float* c = cd.const_data_ptr<float>();
  at::Tensor out = at::empty({M, N}, x2.options());
  if (M == 0 || N == 0) {
    out.zero_();
  } else if (M <= kGemvMaxRows || K == 0) {
    // y[m, o] = sum_k x[m, k] W[o, k]: x converted to fp32 once, each W row decoded once.
    const at::Tensor xf = x2.to(at::kFloat);
    const float* xp = xf.const_data_ptr<float>();
    at::Tensor acc = at::empty({M, N}, x2.options().dtype(at::kFloat));
    float* yp = acc.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t o0, int64_t o1) {
      std::vector<float> row(K);
      for (int64_t o = o0; o < o1; ++o) {
        decode_row_range(o, 0, K, K, p, a, c, blocksize, row.data());
        for (int64_t m = 0; m < M; ++m) {
          const float* xr = xp + m * K;
          float s = 0.0f;
          for (int64_t k = 0; k < K; ++k) s += xr[k] * row[k];
          yp[m * N + o] = s;
        }
      }
    });
    out.copy_(acc);
  } else {
    const int64_t tr = tile_rows(N, K);
    at::Tensor tile = at::empty({tr, K}, x2.options());
    for (int64_t r0 = 0; r0 < N; r0 += tr) {
      const int64_t r1 = std::min(N, r0 + tr);
      at::Tensor t = tile.narrow(0, 0, r1 - r0);
      decode_rows(r0, r1, K, p, a, c, blocksize, t);
      out.narrow(1, r0, r1 - r0).copy_(at::mm(x2, t.t()));
    }
  }
  if (bias.has_value()) out.add_(bias->to(out.scalar_type()));
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
  const uint8_t* p = pk.const_data_ptr<uint8_t>();
  const float* a = am.const_data_ptr<float>();
  const float* c = cd.const_data_ptr<float>();
  at::Tensor acc = at::zeros({M, K}, g2.options().dtype(at::kFloat));
  if (M > 0 && N > 0 && K > 0) {
    if (M <= kGemvMaxRows) {
      // dx[m, k0:k1] = sum_o g[m, o] W[o, k0:k1]: each thread owns a column range of dx.
      const at::Tensor gf = g2.to(at::kFloat);
      const float* gp = gf.const_data_ptr<float>();
      float* dp = acc.data_ptr<float>();
      at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
        std::vector<float> row(k1 - k0);
        for (int64_t o = 0; o < N; ++o) {
          decode_row_range(o, k0, k1, K, p, a, c, blocksize, row.data());
          for (int64_t m = 0; m < M; ++m) {
            const float gv = gp[m * N + o];
            float* d = dp + m * K + k0;
            for (int64_t k = 0; k < k1 - k0; ++k) d[k] += gv * row[k];
          }
        }
      });
    } else {
      const int64_t tr = tile_rows(N, K);
      at::Tensor tile = at::empty({tr, K}, g2.options());
      for (int64_t r0 = 0; r0 < N; r0 += tr) {
        const int64_t r1 = std::min(N, r0 + tr);
        at::Tensor t = tile.narrow(0, 0, r1 - r0);
        decode_rows(r0, r1, K, p, a, c, blocksize, t);
        acc.add_(at::mm(g2.narrow(1, r0, r1 - r0), t));
      }
    }
  }
  return acc.to(grad.scalar_type()).reshape(leading_shape(grad, K));
}

TORCH_LIBRARY_IMPL(peftx, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("nf4_double_quantize", &nf4_double_quantize_cpu);
  m.impl("nf4_double_dequantize", &nf4_double_dequantize_cpu);
  m.impl("nf4_matmul", &nf4_matmul_cpu);
  m.impl("nf4_matmul_t", &nf4_matmul_t_cpu);
}

}  // namespace nf4
}  // namespace peftx
