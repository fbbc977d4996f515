// Argument checks for the NF4 ops, shared by the CPU and CUDA registrations so both devices reject
// the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {

// A 4-bit weight of `numel` elements: packed bytes, fp32 absmax per block, 16-entry code book.
inline void check_state(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                        const at::Tensor& code, int64_t blocksize, int64_t numel) {
  check_blocksize(op, blocksize);
  PEFTX_CHECK_DTYPE(op, "packed", packed, at::kByte);
  PEFTX_CHECK_DTYPE(op, "absmax", absmax, at::kFloat);
  PEFTX_CHECK_DTYPE(op, "code", code, at::kFloat);
  TORCH_CHECK(code.numel() == 16, op, ": code must have 16 entries, got ", code.numel());
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, op, ": packed must hold ", (numel + 1) / 2,
              " bytes for ", numel, " elements, got ", packed.numel());
  TORCH_CHECK(absmax.numel() == num_blocks(numel, blocksize), op, ": absmax must hold ",
              num_blocks(numel, blocksize), " blocks for ", numel, " elements at blocksize ",
              blocksize, ", got ", absmax.numel());
  PEFTX_CHECK_SAME_DEVICE(op, "absmax", absmax, packed);
  PEFTX_CHECK_SAME_DEVICE(op, "code", code, packed);
}

// x [..., in_features] against W [out_features, in_features]; returns x as a contiguous 2-D view.
inline at::Tensor check_matmul_input(const char* op, const char* name, const at::Tensor& x,
                                     int64_t features, const at::Tensor& packed) {
  PEFTX_CHECK_DTYPE_FLOAT(op, name, x);
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must have at least 1 dimension, got a scalar");
  TORCH_CHECK(x.size(-1) == features, op, ": ", name, " must have last dimension ", features,
              ", got shape ", x.sizes());
  PEFTX_CHECK_SAME_DEVICE(op, name, x, packed);
  return x.reshape({-1, features}).contiguous();
}

inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t out_features,
                       const at::Tensor& x) {
  if (!bias.has_value()) return;
  PEFTX_CHECK_DTYPE_FLOAT(op, "bias", (*bias));
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op,
              ": bias must have shape [", out_features, "], got ", bias->sizes());
  PEFTX_CHECK_SAME_DEVICE(op, "bias", (*bias), x);
}

inline void check_double_quantize(const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  constexpr const char* op = "nf4_double_quantize";
  PEFTX_CHECK_DTYPE(op, "absmax", absmax, at::kFloat);
  PEFTX_CHECK_DTYPE(op, "code", code, at::kFloat);
  TORCH_CHECK(code.numel() == 256, op, ": code must have 256 entries, got ", code.numel());
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK(absmax.numel() > 0, op, ": absmax must not be empty");
  PEFTX_CHECK_SAME_DEVICE(op, "code", code, absmax);
}

inline void check_double_dequantize(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                    const at::Tensor& code, const at::Tensor& offset, int64_t blocksize) {
  constexpr const char* op = "nf4_double_dequantize";
  PEFTX_CHECK_DTYPE(op, "qabsmax", qabsmax, at::kByte);
  PEFTX_CHECK_DTYPE(op, "nested_absmax", nested_absmax, at::kFloat);
  PEFTX_CHECK_DTYPE(op, "code", code, at::kFloat);
  PEFTX_CHECK_DTYPE(op, "offset", offset, at::kFloat);
  TORCH_CHECK(code.numel() == 256, op, ": code must have 256 entries, got ", code.numel());
  TORCH_CHECK(offset.numel() == 1, op, ": offset must hold one value, got ", offset.numel());
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  const int64_t n = qabsmax.numel();
  TORCH_CHECK(nested_absmax.numel() == num_blocks(n, blocksize), op, ": nested_absmax must hold ",
              num_blocks(n, blocksize), " blocks for ", n, " codes at blocksize ", blocksize, ", got ",
              nested_absmax.numel());
  PEFTX_CHECK_SAME_DEVICE(op, "nested_absmax", nested_absmax, qabsmax);
  PEFTX_CHECK_SAME_DEVICE(op, "code", code, qabsmax);
  PEFTX_CHECK_SAME_DEVICE(op, "offset", offset, qabsmax);
}

inline void check_double_dequantize_out(const at::Tensor& qabsmax, const at::Tensor& out) {
  constexpr const char* op = "nf4_double_dequantize_into";
  PEFTX_CHECK_DTYPE(op, "out", out, at::kFloat);
  TORCH_CHECK(out.numel() == qabsmax.numel() && out.is_contiguous(), op, ": out must be a contiguous tensor of ",
              qabsmax.numel(), " elements (one per qabsmax code), got shape ", out.sizes(),
              out.is_contiguous() ? "" : " (not contiguous)");
  PEFTX_CHECK_SAME_DEVICE(op, "out", out, qabsmax);
}

inline std::vector<int64_t> leading_shape(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = last;
  return shape;
}

}  // namespace nf4
}  // namespace peftx
