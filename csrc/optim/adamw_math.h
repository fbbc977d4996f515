// The fused AdamW step, element by element, and the per-thread work of its CUDA kernels. Included
// by the CPU kernels, the CUDA kernels and the CPU emulation of the CUDA grid, so each formula
// below exists once.
//
// One step for element i of a parameter p with gradient g (t = the parameter's step count after
// this step), in fp32 whatever the parameter's storage type, in torch.optim.AdamW's order:
//   g  = maximize ? -g : g
//   p  = p * (1 - lr * weight_decay)                      decoupled weight decay
//   m  = m + (1 - beta1) * (g - m)                        torch's lerp_(g, 1 - beta1)
//   v  = v * beta2 + ((1 - beta2) * g) * g
//   p  = p + (-lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// The scalars are computed in double on the host and rounded to fp32, as torch does.
//
// 8-bit state (bitsandbytes' blockwise 8-bit Adam): m and v are stored as uint8 codes of the signed /
// unsigned dynamic map (dynamic_map.h) in blocks of kQuantBlock elements with one fp32 absmax each:
//   m[i] = code_signed[qm[i]] * absmax_m[i / 256],   v[i] = code_unsigned[qv[i]] * absmax_v[i / 256].
// A step decodes, updates as above, and re-encodes each block with its new absmax = max |m| (|v|):
// full blocks scale by m * (1 / max(absmax, 1e-38)), a tensor's tail block by m / max(absmax,
// 1e-38) and stores the clamped absmax (bitsandbytes' quantize_blockwise exactly), and takes the
// nearest code, except that a positive second moment never encodes to 0: it takes the smallest
// nonzero code instead. (Nearest rounding sends v below 1.6e-7 of its block's absmax to 0; with a
// nonzero m the next step would then divide by eps alone. The floor bounds that step.) A block whose
// new absmax is not finite stores absmax NaN and codes 0, so its state decodes to NaN everywhere.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "optim/dynamic_map.h"

namespace peftx {
namespace optim {

// Launch geometry shared by the CUDA kernels and their emulation: 1-D grids of kThreads-thread
// blocks. The fp32 kernel gives each block kChunk consecutive elements of one tensor; the 8-bit
// kernel gives each block one quantization block (thread j owns element j of it).
constexpr int kThreads = 256;
constexpr int64_t kChunk = 16 * kThreads;
constexpr int64_t kQuantBlock = 256;
constexpr float kAbsmaxFloor = 1e-38f;

// Hyperparameters of one call, fp32 as the kernels use them.
struct AdamWHyper {
  float decay;      // 1 - lr * weight_decay
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float grad_sign;  // -1 when maximizing, else 1
};

// One tensor of a multi-tensor fp32-state call. Pointers are contiguous; n elements each.
struct AdamWTensor {
  void* param;          // T [n]
  const void* grad;     // T [n]
  float* exp_avg;       // [n]
  float* exp_avg_sq;    // [n]
  int64_t n;
  float neg_step_size;  // -lr / (1 - beta1^t)
  float bc2_sqrt;       // sqrt(1 - beta2^t)
};

// One tensor of a multi-tensor 8-bit-state call.
struct AdamW8Tensor {
  void* param;             // T [n]
  const void* grad;        // T [n]
  uint8_t* exp_avg_q;      // [n] codes of the signed map
  float* exp_avg_absmax;   // [ceil(n / 256)]
  uint8_t* exp_avg_sq_q;   // [n] codes of the unsigned map
  float* exp_avg_sq_absmax;
  int64_t n;
  float neg_step_size;
  float bc2_sqrt;
};

// A unit of work: kChunk elements (fp32 state) or one quantization block (8-bit) of one tensor.
struct WorkItem {
  int32_t tensor;
  int32_t unused;
  int64_t begin;
};

struct Moments {
  float m, v;
};

PEFTX_HD float sqrt_rn(float v) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(v);
#else
  return __builtin_sqrtf(v);
#endif
}

// The update shared by both state formats: g, p, m, v in fp32 in; new p returned, m and v updated.
// Every operation is separately rounded (no FMA contraction on either side), so the CUDA kernels
// and the CPU kernels agree bit for bit.
PEFTX_HD float adamw_math(float p, float g, float& m, float& v, const AdamWHyper& h, float neg_step_size,
                          float bc2_sqrt) {
  g = mul_rn(g, h.grad_sign);
  p = mul_rn(p, h.decay);
  m = add_rn(m, mul_rn(h.one_minus_beta1, add_rn(g, -m)));
  v = add_rn(mul_rn(v, h.beta2), mul_rn(mul_rn(h.one_minus_beta2, g), g));
  const float denom = add_rn(div_rn(sqrt_rn(v), bc2_sqrt), h.eps);
  return add_rn(p, div_rn(mul_rn(neg_step_size, m), denom));
}

// Element i of a tensor with fp32 state.
template <typename T>
PEFTX_HD void adamw_element(int64_t i, const AdamWTensor& t, const AdamWHyper& h) {
  T* p = static_cast<T*>(t.param);
  const T* g = static_cast<const T*>(t.grad);
  float m = t.exp_avg[i], v = t.exp_avg_sq[i];
  const float np = adamw_math(to_float(p[i]), to_float(g[i]), m, v, h, t.neg_step_size, t.bc2_sqrt);
  store(p + i, np);
  t.exp_avg[i] = m;
  t.exp_avg_sq[i] = v;
}

// Thread `thread` of block `block` of the fp32-state kernel: elements begin + thread, + kThreads, ...
// of its work item's chunk.
template <typename T>
PEFTX_HD void adamw_thread(int64_t block, int thread, const AdamWTensor* tensors, const WorkItem* items,
                           const AdamWHyper& h) {
  const WorkItem w = items[block];
  const AdamWTensor& t = tensors[w.tensor];
  const int64_t end = w.begin + kChunk < t.n ? w.begin + kChunk : t.n;
  for (int64_t i = w.begin + thread; i < end; i += kThreads) adamw_element<T>(i, t, h);
}

// --- 8-bit state -------------------------------------------------------------------------------

PEFTX_HD int64_t quant_blocks(int64_t n) { return (n + kQuantBlock - 1) / kQuantBlock; }

// Phase 1 of element i: decode m and v with the block's current absmax, update, write p; returns
// the new fp32 moments (the block's new absmax is the max of their magnitudes).
template <typename T>
PEFTX_HD Moments adamw8_update(int64_t i, const AdamW8Tensor& t, const AdamWHyper& h, const QuantTables& q) {
  T* p = static_cast<T*>(t.param);
  const T* g = static_cast<const T*>(t.grad);
  const int64_t blk = i / kQuantBlock;
  Moments s{mul_rn(q.code[0][t.exp_avg_q[i]], t.exp_avg_absmax[blk]),
            mul_rn(q.code[1][t.exp_avg_sq_q[i]], t.exp_avg_sq_absmax[blk])};
  const float np = adamw_math(to_float(p[i]), to_float(g[i]), s.m, s.v, h, t.neg_step_size, t.bc2_sqrt);
  store(p + i, np);
  return s;
}

// |x| as bits: for non-negative floats the uint32 order is the float order, with inf above every
// finite value and NaN above inf. The block's new absmax is bits_float(max of abs_bits), an exact,
// order-free reduction (integer max) that propagates NaN, on the CPU and the device alike.
PEFTX_HD uint32_t abs_bits(float x) { return float_bits(x) & 0x7fffffffu; }

// The absmax a block stores, and the factor its elements are scaled by before encoding.
struct BlockScale {
  float stored;
  float inv;    // 1 / max(absmax, 1e-38) (full blocks)
  float floor;  // max(absmax, 1e-38) (tail block: divides)
  bool tail;
  bool finite;
};

PEFTX_HD BlockScale block_scale(float amax, bool tail) {
  BlockScale s;
  s.finite = amax <= 3.402823466e38f;  // false for inf and NaN
  s.floor = amax > kAbsmaxFloor ? amax : kAbsmaxFloor;
  s.inv = div_rn(1.0f, s.floor);
  s.tail = tail;
  s.stored = !s.finite ? bits_float(0x7fc00000u) : (tail ? s.floor : amax);
  return s;
}

PEFTX_HD uint8_t encode_moment(const QuantTables& q, int map, float x, const BlockScale& s) {
  if (!s.finite) return 0;
  float t = s.tail ? div_rn(x, s.floor) : mul_rn(x, s.inv);
  t = t < -1.0f ? -1.0f : (t > 1.0f ? 1.0f : t);
  const uint8_t c = encode_nearest(q, map, t);
  return map == 1 && c == 0 && t > 0.0f ? 1 : c;
}

// Phase 2 of element i: encode the new moments with the block's new scales.
PEFTX_HD void adamw8_store(int64_t i, const AdamW8Tensor& t, Moments s, const BlockScale& sm,
                           const BlockScale& sv, const QuantTables& q) {
  t.exp_avg_q[i] = encode_moment(q, 0, s.m, sm);
  t.exp_avg_sq_q[i] = encode_moment(q, 1, s.v, sv);
}

PEFTX_HD bool is_tail_block(int64_t blk, int64_t n) { return (blk + 1) * kQuantBlock > n; }

// The 8-bit kernel: CUDA block `block` owns work item items[block] (one quantization block), thread
// `thread` its element begin + thread. Phase 1 returns whether the thread has an element and its new
// moments; the block then reduces abs_bits of the moments of its active threads with an integer max;
// phase 2 encodes with the reduced absmax, and thread 0 stores the block's absmax. Every thread has
// read the old absmax in phase 1 before any thread reaches phase 2 (the reduction synchronizes).
template <typename T>
PEFTX_HD bool adamw8_thread_update(int64_t block, int thread, const AdamW8Tensor* tensors, const WorkItem* items,
                                   const AdamWHyper& h, const QuantTables& q, Moments& s) {
  const WorkItem w = items[block];
  const AdamW8Tensor& t = tensors[w.tensor];
  const int64_t i = w.begin + thread;
  if (i >= t.n) return false;
  s = adamw8_update<T>(i, t, h, q);
  return true;
}

PEFTX_HD void adamw8_thread_store(int64_t block, int thread, const AdamW8Tensor* tensors, const WorkItem* items,
                                  Moments s, uint32_t m_bits, uint32_t v_bits, const QuantTables& q) {
  const WorkItem w = items[block];
  const AdamW8Tensor& t = tensors[w.tensor];
  const int64_t blk = w.begin / kQuantBlock;
  const bool tail = is_tail_block(blk, t.n);
  const BlockScale sm = block_scale(bits_float(m_bits), tail), sv = block_scale(bits_float(v_bits), tail);
  const int64_t i = w.begin + thread;
  if (i < t.n) adamw8_store(i, t, s, sm, sv, q);
  if (thread == 0) {
    t.exp_avg_absmax[blk] = sm.stored;
    t.exp_avg_sq_absmax[blk] = sv.stored;
  }
}

}  // namespace optim
}  // namespace peftx
