// The one place peftx op schemas are defined. Device kernels live next to their math
// (csrc/<family>/<family>_cpu.cpp, <family>_cuda_reg.cpp); fakes and autograd live in peftx/ops/.
#include <torch/library.h>

TORCH_LIBRARY(peftx, m) {
  // A contiguous copy of t; on the CPU, from 4 MiB up, in memory backed by 2 MiB pages
  // (common/huge_alloc.h): for long-lived weights read in strided passes.
  m.def("huge_page_clone(Tensor t) -> Tensor");
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
  // The same into `out` (fp32, contiguous, qabsmax's numel and device): a caller that decodes the
  // same absmax every step reuses one buffer instead of fresh pages each time.
  m.def(
      "nf4_double_dequantize_into(Tensor qabsmax, Tensor nested_absmax, Tensor code, Tensor offset, int "
      "blocksize, Tensor(a!) out) -> ()");
  // y = x @ W.T + bias for x [..., in_features], W [out_features, in_features] stored as above.
  m.def(
      "nf4_matmul(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int "
      "out_features, Tensor? bias=None) -> Tensor");
  // dx = grad @ W for grad [..., out_features]: the input gradient of nf4_matmul.
  m.def(
      "nf4_matmul_t(Tensor grad, Tensor packed, Tensor absmax, Tensor code, int blocksize, int "
      "in_features) -> Tensor");

  // LoRA over a frozen base: y = x W^T + bias + scaling * dropout(x) A^T B^T for x [..., in],
  // W [out, in] dense (absmax, code absent) or NF4 (weight = packed bytes; absmax, code, blocksize
  // as above), lora_A [r, in], lora_B [out, r]. Returns y and u = dropout(x) A^T [tokens, r], which
  // the backward needs. The dropout mask is a function of `seed` (csrc/lora/lora_math.h). `seed` is a
  // SymInt so that torch.compile can trace a seed drawn in the graph (torch.randint(...).item(), an
  // unbacked value) without specializing on it; the kernels receive its concrete value.
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? absmax, Tensor? code, int blocksize, Tensor? "
      "bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, SymInt seed) -> (Tensor out, "
      "Tensor u)");
  // lora_linear_fwd over an NF4 weight with double-quantized absmax (qabsmax uint8 codes of the
  // dynamic map, nested_absmax, nested_code [256], offset [] fp32, nested_blocksize): the fp32 absmax
  // is decoded per call and never saved (csrc/lora/lora_nf4dq.cpp).
  m.def(
      "lora_linear_nf4dq_fwd(Tensor x, Tensor packed, Tensor qabsmax, Tensor nested_absmax, Tensor nested_code, "
      "Tensor offset, Tensor code, int blocksize, int nested_blocksize, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout_p, SymInt seed) -> (Tensor out, Tensor u)");
  // Gradients of lora_linear_fwd for grad [..., out]: dx (the base path included; empty unless
  // need_dx), d lora_A [r, in], d lora_B [out, r]. The mask is regenerated from `seed`.
  m.def(
      "lora_linear_bwd(Tensor grad, Tensor x, Tensor u, Tensor weight, Tensor? absmax, Tensor? code, int "
      "blocksize, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, SymInt seed, bool need_dx) -> "
      "(Tensor dx, Tensor d_lora_A, Tensor d_lora_B)");
  // Mixed-adapter batch: y[m] = base_out[m] + scalings[a] * x[m] A[a]^T B[a]^T with a = adapter_ids[m]
  // (-1: base_out only). lora_A [n, r, in], lora_B [n, out, r] (ranks padded with zeros to r).
  m.def(
      "lora_multi_fwd(Tensor x, Tensor base_out, Tensor lora_A, Tensor lora_B, Tensor scalings, Tensor "
      "adapter_ids) -> Tensor");

  // DoRA's weight norm over an NF4 base (csrc/dora/): norm[o] = ||dequant(W)[o, :] + scale * (B A)[o, :]||_2
  // fp32 [out_features], for W [out, in] stored as above, lora_A [r, in], lora_B [out, r]; the dense
  // weight is never materialised. Not differentiable (DoRA detaches the norm).
  m.def(
      "nf4_lora_row_norm(Tensor packed, Tensor absmax, Tensor code, int blocksize, Tensor lora_A, Tensor lora_B, "
      "float scale) -> Tensor");
  // The same norm over a dense W [out, in] (float32, float16 or bfloat16): ||W[o, :] + scale * (B A)[o, :]||_2,
  // fp32 [out_features], without materialising W + scale B A. Not differentiable.
  m.def("dense_lora_row_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor");

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
  m.def(
      "nf4_dequantize8_kernel(Tensor packed, Tensor absmax, Tensor code, int blocksize, int n, "
      "ScalarType dtype) -> Tensor");
  m.def("nf4_double_quantize_kernel(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "nf4_double_dequantize_kernel(Tensor q, Tensor nested_absmax, Tensor code, Tensor offset, int "
      "blocksize) -> Tensor");
  m.def(
      "nf4_gemv_kernel(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int "
      "out_features) -> Tensor");
  m.def("lora_dropout_kernel(Tensor x, int seed, float p) -> Tensor");
  m.def("lora_dropout_axpy_kernel(Tensor t, Tensor dx, int seed, float p) -> Tensor");
  m.def(
      "lora_multi_kernel(Tensor x, Tensor base_out, Tensor lora_A, Tensor lora_B, Tensor scalings, Tensor "
      "adapter_ids) -> Tensor");
  m.def(
      "nf4_lora_row_norm_kernel(Tensor packed, Tensor absmax, Tensor code, int blocksize, Tensor lora_A, Tensor "
      "lora_B, float scale) -> Tensor");
  m.def("dense_lora_row_norm_kernel(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor");

  m.def(
      "adamw_step_kernel(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] "
      "exp_avg_sqs, Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool "
      "maximize, bool increment_steps=False) -> ()");
  m.def(
      "adamw8bit_step_kernel(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_codes, Tensor(c!)[] "
      "exp_avg_absmax, Tensor(d!)[] exp_avg_sq_codes, Tensor(e!)[] exp_avg_sq_absmax, Tensor(f!)[] steps, float "
      "lr, float beta1, float beta2, float eps, float weight_decay, bool maximize, bool increment_steps=False) -> ()");
}
