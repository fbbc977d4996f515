// CUDA registration of the NF4 ops: argument checks, the current stream, kernel launches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_reg.h"
#include "nf4/nf4_checks.h"
#include "nf4/nf4_cuda.h"

namespace peftx {
namespace nf4 {
namespace {

// Rows of x up to which nf4_matmul runs the decode-in-registers GEMV kernel (it decodes W once per
// 4 rows of x); beyond it, and for every nf4_matmul_t, W is dequantized and cuBLAS runs the product
// through at::mm. Measured on an H100 (4096 x 4096 and 11008 x 4096 weights): the GEMV takes
// 0.4-0.8x the time of dequantize + matmul up to 2-4 rows of a 16-bit x and up to ~8-12 of an fp32 x,
// and falls behind beyond. (An earlier one-thread-per-output transposed GEMV walked W's rows
// serially with strided byte loads, 36x slower than dequantize + matmul; it is gone.)
int64_t gemv_max_rows(at::ScalarType t) { return t == at::kFloat ? 8 : 3; }

void check_finite_absmax(const char* op, const at::Tensor& absmax) {
  TORCH_CHECK(at::isfinite(absmax).all().item<bool>(), op,
              ": weight contains NaN or inf; NF4 cannot represent them");
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& weight, int64_t blocksize) {
  constexpr const char* op = "nf4_quantize";
  check_blocksize(op, blocksize);
  PEFTX_CHECK_DTYPE_FLOAT(op, "weight", weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({num_blocks(n, blocksize)}, w.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_nf4_quantize(kind_of(w.scalar_type(), "peftx nf4"), w.const_data_ptr(), n, blocksize,
                                     packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), current_stream()));
  if (n > 0) check_finite_absmax(op, absmax);
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, c10::SymIntArrayRef shape_sym, at::ScalarType dtype) {
  constexpr const char* op = "nf4_dequantize";
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_sym);
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, op, ": shape must be non-negative, got ", shape);
    n *= s;
  }
  check_state(op, packed, absmax, code, blocksize, n);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  C10_CUDA_CHECK(launch_nf4_dequantize(kind_of(dtype, "peftx nf4"), pk.const_data_ptr<uint8_t>(),
                                       am.const_data_ptr<float>(), cd.const_data_ptr<float>(),
                                       blocksize, n, out.data_ptr(), current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_double_quantize_cuda(const at::Tensor& absmax,
                                                                       const at::Tensor& code,
                                                                       int64_t blocksize) {
  check_double_quantize(absmax, code, blocksize);
  const c10::cuda::CUDAGuard guard(absmax.device());
  at::Tensor offset = absmax.mean();
  const at::Tensor centered = (absmax - offset).contiguous();
  const at::Tensor cd = code.contiguous();
  const int64_t n = centered.numel();
  at::Tensor q = at::empty({n}, absmax.options().dtype(at::kByte));
  at::Tensor nested = at::empty({num_blocks(n, blocksize)}, absmax.options());
  C10_CUDA_CHECK(launch_nf4_double_quantize(centered.const_data_ptr<float>(), n, blocksize,
                                            cd.const_data_ptr<float>(), q.data_ptr<uint8_t>(),
                                            nested.data_ptr<float>(), current_stream()));
  return {q, nested, offset};
}

void nf4_double_dequantize_into_cuda(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                     const at::Tensor& code, const at::Tensor& offset, int64_t blocksize,
                                     const at::Tensor& out) {
  check_double_dequantize(qabsmax, nested_absmax, code, offset, blocksize);
  check_double_dequantize_out(qabsmax, out);
  const int64_t n = qabsmax.numel();
  const c10::cuda::CUDAGuard guard(qabsmax.device());
  const at::Tensor q = qabsmax.contiguous(), na = nested_absmax.contiguous(), cd = code.contiguous();
  const at::Tensor off = offset.reshape({1}).contiguous();
  C10_CUDA_CHECK(launch_nf4_double_dequantize(q.const_data_ptr<uint8_t>(), na.const_data_ptr<float>(),
                                              cd.const_data_ptr<float>(), off.const_data_ptr<float>(),
                                              blocksize, n, out.data_ptr<float>(), current_stream()));
}

at::Tensor nf4_double_dequantize_cuda(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                      const at::Tensor& code, const at::Tensor& offset,
                                      int64_t blocksize) {
  check_double_dequantize(qabsmax, nested_absmax, code, offset, blocksize);
  at::Tensor out = at::empty({qabsmax.numel()}, nested_absmax.options());
  nf4_double_dequantize_into_cuda(qabsmax, nested_absmax, code, offset, blocksize, out);
  return out;
}

at::Tensor nf4_matmul_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const at::Tensor& code, int64_t blocksize, int64_t out_features,
                           const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "nf4_matmul";
  TORCH_CHECK(out_features >= 0, op, ": out_features must be non-negative, got ", out_features);
  const int64_t K = x.dim() >= 1 ? x.size(-1) : 0;
  const at::Tensor x2 = check_matmul_input(op, "x", x, K, packed);
  check_state(op, packed, absmax, code, blocksize, out_features * K);
  check_bias(op, bias, out_features, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x2.size(0), N = out_features;
  const at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  at::Tensor out;
  if (M <= gemv_max_rows(x2.scalar_type()) &&
      nf4_gemv_supported(K, pk.const_data_ptr<uint8_t>(), x2.const_data_ptr())) {
    at::Tensor y = at::empty({M, N}, x2.options().dtype(at::kFloat));
    C10_CUDA_CHECK(launch_nf4_gemv(kind_of(x2.scalar_type(), "peftx nf4"), x2.const_data_ptr(), M, K, N,
                                   pk.const_data_ptr<uint8_t>(), am.const_data_ptr<float>(),
                                   cd.const_data_ptr<float>(), blocksize, y.data_ptr<float>(),
                                   current_stream()));
    out = y.to(x2.scalar_type());
  } else {
    at::Tensor w = at::empty({N, K}, x2.options());
    C10_CUDA_CHECK(launch_nf4_dequantize(kind_of(x2.scalar_type(), "peftx nf4"), pk.const_data_ptr<uint8_t>(),
                                         am.const_data_ptr<float>(), cd.const_data_ptr<float>(),
                                         blocksize, N * K, w.data_ptr(), current_stream()));
    out = at::mm(x2, w.t());
  }
  if (bias.has_value()) out.add_(bias->to(out.scalar_type()));
  return out.reshape(leading_shape(x, N));
}

at::Tensor nf4_matmul_t_cuda(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                             const at::Tensor& code, int64_t blocksize, int64_t in_features) {
  constexpr const char* op = "nf4_matmul_t";
  TORCH_CHECK(in_features >= 0, op, ": in_features must be non-negative, got ", in_features);
  const int64_t N = grad.dim() >= 1 ? grad.size(-1) : 0;
  const at::Tensor g2 = check_matmul_input(op, "grad", grad, N, packed);
  check_state(op, packed, absmax, code, blocksize, N * in_features);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t K = in_features;
  const at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), cd = code.contiguous();
  at::Tensor w = at::empty({N, K}, g2.options());
  C10_CUDA_CHECK(launch_nf4_dequantize(kind_of(g2.scalar_type(), "peftx nf4"), pk.const_data_ptr<uint8_t>(),
                                       am.const_data_ptr<float>(), cd.const_data_ptr<float>(), blocksize, N * K,
                                       w.data_ptr(), current_stream()));
  const at::Tensor out = at::mm(g2, w);
  return out.reshape(leading_shape(grad, K));
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize_cuda);
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("nf4_double_quantize", &nf4_double_quantize_cuda);
  m.impl("nf4_double_dequantize", &nf4_double_dequantize_cuda);
  m.impl("nf4_double_dequantize_into", &nf4_double_dequantize_into_cuda);
  m.impl("nf4_matmul", &nf4_matmul_cuda);
  m.impl("nf4_matmul_t", &nf4_matmul_t_cuda);
}

}  // namespace nf4
}  // namespace peftx
