// The one place peftx op schemas are defined. Device kernels live next to their math
// (csrc/<family>/<family>_cpu.cpp, <family>_cuda_reg.cpp); fakes and autograd live in peftx/ops/.
#include <torch/library.h>

TORCH_LIBRARY(peftx, m) {
  // NF4 (bitsandbytes-compatible 4-bit) storage. packed: uint8 [ceil(n / 2), 1]; absmax: fp32
  // [ceil(n / blocksize)]; code: fp32 [16] (the NF4 or FP4 code book).
  m.def("nf4_quantize(Tensor weight, int blocksize) -> (Tensor packed, Tensor absmax)");
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, Tensor code, int blocksize, SymInt[] shape, "
      "ScalarType dtype) -> Tensor");
  // Double quantization of absmax: 8-bit blockwise codes of (absmax - mean) with the dynamic map.
  m.def(
      "nf4_double_quantize(Tensor absmax, Tensor code, int blocksize) -> (Tensor qabsmax, Tensor "
      "nested_absmax, Tensor offset)");
  m.def(
      "nf4_double_dequantize(Tensor qabsmax, Tensor nested_absmax, Tensor code, Tensor offset, int "
      "blocksize) -> Tensor");
  // y = x @ W.T + bias for x [..., in_features], W [out_features, in_features] stored as above.
  m.def(
      "nf4_matmul(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int "
      "out_features, Tensor? bias=None) -> Tensor");
  // dx = grad @ W for grad [..., out_features]: the input gradient of nf4_matmul.
  m.def(
      "nf4_matmul_t(Tensor grad, Tensor packed, Tensor absmax, Tensor code, int blocksize, int "
      "in_features) -> Tensor");
}

// Test-only: the CUDA kernels' per-thread functions run over their whole emulated grid on the CPU
// (csrc/<family>/<family>_emulate.cpp). Inputs are contiguous; the GEMV outputs are fp32.
TORCH_LIBRARY(peftx_emulate, m) {
  m.def("nf4_quantize_kernel(Tensor weight, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "nf4_dequantize_kernel(Tensor packed, Tensor absmax, Tensor code, int blocksize, int n, "
      "ScalarType dtype) -> Tensor");
  m.def("nf4_double_quantize_kernel(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "nf4_double_dequantize_kernel(Tensor q, Tensor nested_absmax, Tensor code, Tensor offset, int "
      "blocksize) -> Tensor");
  m.def(
      "nf4_gemv_kernel(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int "
      "out_features) -> Tensor");
  m.def(
      "nf4_gemv_t_kernel(Tensor grad, Tensor packed, Tensor absmax, Tensor code, int blocksize, int "
      "in_features) -> Tensor");
}
