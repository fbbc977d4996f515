// CPU kernels of the fused AdamW steps (fp32 state and 8-bit state). The element math is the shared
// code in adamw_math.h (what the CUDA kernels run per thread). Three builds of each loop: explicit
// AVX-512 (adamw_avx512.h, the same operations 16 lanes wide), and the plain loops below compiled
// for AVX2 and for the x86-64 baseline (auto-vectorized where GCC manages); the widest the CPU
// supports is picked once (PEFTX_CPU_ISA=avx512|avx2|base overrides it, for measuring). Work is
// split over tensors and chunks of tensors with at::parallel_for: one call for many small tensors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/dispatch.h"
#include "optim/adamw_avx512.h"
#include "optim/adamw_host.h"
#include "optim/adamw_math.h"

namespace peftx {
namespace optim {
namespace {

constexpr const char* kStep = "adamw_step";
constexpr const char* kStep8 = "adamw8bit_step";
// Elements per parallel work item: 8 Ki (fp32 state: 32 KiB of each stream), 32 quantization
// blocks (8-bit state).
constexpr int64_t kCpuChunk = 8192;
constexpr int64_t kCpuChunk8 = 32 * kQuantBlock;

#define PEFTX_ALWAYS_INLINE inline __attribute__((always_inline))

template <typename T>
PEFTX_ALWAYS_INLINE void adamw_range(const AdamWTensor& t, int64_t b, int64_t e, const AdamWHyper& hh) {
  T* __restrict__ p = static_cast<T*>(t.param);
  const T* __restrict__ g = static_cast<const T*>(t.grad);
  float* __restrict__ m = t.exp_avg;
  float* __restrict__ v = t.exp_avg_sq;
  const AdamWHyper h = hh;
  const float ns = t.neg_step_size, bc = t.bc2_sqrt;
  for (int64_t i = b; i < e; ++i) {
    float mi = m[i], vi = v[i];
    const float np = adamw_math(to_float(p[i]), to_float(g[i]), mi, vi, h, ns, bc);
    store(p + i, np);
    m[i] = mi;
    v[i] = vi;
  }
}

// Quantization blocks [blk0, blk1) of one tensor: phase 1 (decode, update, new absmax) and phase 2
// (encode) of adamw_math.h, a block at a time.
template <typename T>
PEFTX_ALWAYS_INLINE void adamw8_range(const AdamW8Tensor& t, int64_t blk0, int64_t blk1, const AdamWHyper& hh,
                                      const QuantTables& q) {
  const AdamWHyper h = hh;
  const float ns = t.neg_step_size, bc = t.bc2_sqrt;
  float mb[kQuantBlock], vb[kQuantBlock];
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t b = blk * kQuantBlock;
    const int64_t len = std::min<int64_t>(kQuantBlock, t.n - b);
    T* __restrict__ p = static_cast<T*>(t.param) + b;
    const T* __restrict__ g = static_cast<const T*>(t.grad) + b;
    uint8_t* __restrict__ qm = t.exp_avg_q + b;
    uint8_t* __restrict__ qv = t.exp_avg_sq_q + b;
    const float am = t.exp_avg_absmax[blk], av = t.exp_avg_sq_absmax[blk];
    uint32_t mbits = 0, vbits = 0;
    for (int64_t j = 0; j < len; ++j) {
      float m = mul_rn(q.code[0][qm[j]], am), v = mul_rn(q.code[1][qv[j]], av);
      const float np = adamw_math(to_float(p[j]), to_float(g[j]), m, v, h, ns, bc);
      store(p + j, np);
      mb[j] = m;
      vb[j] = v;
      mbits = std::max(mbits, abs_bits(m));
      vbits = std::max(vbits, abs_bits(v));
    }
    const bool tail = is_tail_block(blk, t.n);
    const BlockScale sm = block_scale(bits_float(mbits), tail), sv = block_scale(bits_float(vbits), tail);
    for (int64_t j = 0; j < len; ++j) {
      qm[j] = encode_moment(q, 0, mb[j], sm);
      qv[j] = encode_moment(q, 1, vb[j], sv);
    }
    t.exp_avg_absmax[blk] = sm.stored;
    t.exp_avg_sq_absmax[blk] = sv.stored;
  }
}

#if defined(__x86_64__)
#define PEFTX_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define PEFTX_TARGET_AVX2
#endif

#if defined(__x86_64__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // see adamw_avx512.h
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void adamw_range_avx512(const AdamWTensor& t, int64_t b,
                                                                                        int64_t e, const AdamWHyper& h) {
  avx512::adamw_range<T>(t, b, e, h);
}
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void adamw8_range_avx512(
    const AdamW8Tensor& t, int64_t b0, int64_t b1, const AdamWHyper& h, const QuantTables& q) {
  avx512::adamw8_range<T>(t, b0, b1, h, q);
}
#pragma GCC diagnostic pop
#endif
template <typename T>
PEFTX_TARGET_AVX2 void adamw_range_avx2(const AdamWTensor& t, int64_t b, int64_t e, const AdamWHyper& h) {
  adamw_range<T>(t, b, e, h);
}
template <typename T>
void adamw_range_base(const AdamWTensor& t, int64_t b, int64_t e, const AdamWHyper& h) {
  adamw_range<T>(t, b, e, h);
}
template <typename T>
PEFTX_TARGET_AVX2 void adamw8_range_avx2(const AdamW8Tensor& t, int64_t b0, int64_t b1, const AdamWHyper& h,
                                         const QuantTables& q) {
  adamw8_range<T>(t, b0, b1, h, q);
}
template <typename T>
void adamw8_range_base(const AdamW8Tensor& t, int64_t b0, int64_t b1, const AdamWHyper& h, const QuantTables& q) {
  adamw8_range<T>(t, b0, b1, h, q);
}

enum class Isa { base, avx2, avx512 };

Isa detect_isa() {
  Isa best = Isa::base;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) best = Isa::avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::avx512;
#endif
  const char* env = std::getenv("PEFTX_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const Isa want = std::strcmp(env, "avx512") == 0 ? Isa::avx512 : std::strcmp(env, "avx2") == 0 ? Isa::avx2 : Isa::base;
  TORCH_CHECK(std::strcmp(env, "avx512") == 0 || std::strcmp(env, "avx2") == 0 || std::strcmp(env, "base") == 0,
              "PEFTX_CPU_ISA must be avx512, avx2 or base, got '", env, "'");
  return want <= best ? want : best;
}

Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

template <typename T>
void run_adamw(const std::vector<AdamWTensor>& tensors, const AdamWHyper& h) {
  const std::vector<WorkItem> items = work_items(tensors, kCpuChunk);
  const Isa which = isa();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const AdamWTensor& t = tensors[items[w].tensor];
      const int64_t b = items[w].begin, e = std::min(b + kCpuChunk, t.n);
      switch (which) {
#if defined(__x86_64__)
        case Isa::avx512: adamw_range_avx512<T>(t, b, e, h); break;
#else
        case Isa::avx512:
#endif
        case Isa::avx2: adamw_range_avx2<T>(t, b, e, h); break;
        case Isa::base: adamw_range_base<T>(t, b, e, h); break;
      }
    }
  });
}

template <typename T>
void run_adamw8(const std::vector<AdamW8Tensor>& tensors, const AdamWHyper& h) {
  const std::vector<WorkItem> items = work_items(tensors, kCpuChunk8);
  const QuantTables& q = quant_tables();
  const Isa which = isa();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const AdamW8Tensor& t = tensors[items[w].tensor];
      const int64_t b0 = items[w].begin / kQuantBlock;
      const int64_t b1 = std::min(b0 + kCpuChunk8 / kQuantBlock, quant_blocks(t.n));
      switch (which) {
#if defined(__x86_64__)
        case Isa::avx512: adamw8_range_avx512<T>(t, b0, b1, h, q); break;
#else
        case Isa::avx512:
#endif
        case Isa::avx2: adamw8_range_avx2<T>(t, b0, b1, h, q); break;
        case Isa::base: adamw8_range_base<T>(t, b0, b1, h, q); break;
      }
    }
  });
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool maximize, bool increment) {
  const HyperArgs a{lr, beta1, beta2, eps, weight_decay, maximize, increment};
  Prepared<AdamWTensor> prep;
  prepare_adamw(kStep, params, grads, exp_avgs, exp_avg_sqs, steps, a, prep);
  const AdamWHyper h = make_hyper(a);
  for (size_t k = 0; k < prep.dtypes.size(); ++k)
    dispatch_float(prep.dtypes[k], kStep, [&](auto tag) { run_adamw<typename decltype(tag)::type>(prep.groups[k], h); });
  prep.args.finish();
}

void adamw8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                        at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                        at::TensorList exp_avg_sq_absmax, at::TensorList steps, double lr, double beta1, double beta2,
                        double eps, double weight_decay, bool maximize, bool increment) {
  const HyperArgs a{lr, beta1, beta2, eps, weight_decay, maximize, increment};
  Prepared<AdamW8Tensor> prep;
  prepare_adamw8(kStep8, params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, steps, a,
                 prep);
  const AdamWHyper h = make_hyper(a);
  for (size_t k = 0; k < prep.dtypes.size(); ++k)
    dispatch_float(prep.dtypes[k], kStep8, [&](auto tag) { run_adamw8<typename decltype(tag)::type>(prep.groups[k], h); });
  prep.args.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CPU, m) {
  m.impl("adamw_step", &adamw_step_cpu);
  m.impl("adamw8bit_step", &adamw8bit_step_cpu);
}

}  // namespace optim
}  // namespace peftx
