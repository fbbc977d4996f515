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
  // Fused AdamW steps (csrc/optim/), one call for many tensors: params[i] (fp32/fp16/bf16) and its
  // state are updated in place; steps[i] is the step count of this update: incremented first when
  // increment_steps (once per distinct tensor), else already incremented by the caller.
  // The math: csrc/optim/adamw_math.h. fp32 state:
  m.def(
      "adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize, "
      "bool increment_steps=False) -> ()");
  // 8-bit state: uint8 codes of the signed (m) / unsigned (v) dynamic map, fp32 absmax per 256.
  m.def(
      "adamw8bit_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_codes, Tensor(c!)[] "
      "exp_avg_absmax, Tensor(d!)[] exp_avg_sq_codes, Tensor(e!)[] exp_avg_sq_absmax, Tensor(f!)[] steps, float "
      "lr, float beta1, float beta2, float eps, float weight_decay, bool maximize, bool increment_steps=False) -> ()");
  // The page pool of the paged optimizers is a custom class: csrc/optim/page_pool_reg.cpp.
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
  m.def(
      "adamw_step_kernel(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] "
      "exp_avg_sqs, Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool "
      "maximize, bool increment_steps=False) -> ()");
  m.def(
      "adamw8bit_step_kernel(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_codes, Tensor(c!)[] "
      "exp_avg_absmax, Tensor(d!)[] exp_avg_sq_codes, Tensor(e!)[] exp_avg_sq_absmax, Tensor(f!)[] steps, float "
      "lr, float beta1, float beta2, float eps, float weight_decay, bool maximize, bool increment_steps=False) -> ()");
}
