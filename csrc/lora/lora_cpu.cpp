// CPU kernels of the LoRA ops. bf16 and fp32 inputs on AVX-512 run the low-rank products on the
// rank-r kernels (rank_bf16_cpu.h, rank_f32_cpu.h); everything else runs them through at::mm with
// the dropout fused here. Either way the mask is regenerated from the seed chunk by chunk
// (lora_math.h), so neither the forward nor the backward ever holds a dropped-out copy of the input.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "lora/dropout_cpu.h"
#include "lora/lora_base.h"
#include "lora/lora_math.h"
#include "lora/rank_bf16_cpu.h"
#include "lora/rank_f32_cpu.h"

namespace peftx {
namespace lora {
namespace {

// Elements of x (or of the input gradient) dropped out per chunk: small enough to stay in L2 (1 MiB
// per core on the machines we measure), large enough that each chunk's at::mm is not dominated by
// its fixed cost (32 rows of 4096 features in the forward, 256 columns of 512 tokens in the backward).
constexpr int64_t kChunkElements = 1 << 17;

// Rows ahead whose column-chunk runs the backward prefetches.
constexpr int64_t kPrefetchRows = 4;

// The storage type of the vectorized dropout passes (float64 runs the loops below).
template <typename scalar_t>
constexpr DropDt drop_dt() {
  if constexpr (std::is_same_v<scalar_t, float>) return DropDt::kF32;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) return DropDt::kBF16;
  return DropDt::kF16;
}

template <typename scalar_t>
using opmath = at::opmath_type<scalar_t>;

// Scale a kept element by 1 / (1 - p): fp32 for the 16-bit types and fp32, fp64 for fp64.
template <typename scalar_t>
opmath<scalar_t> keep_scale(const Dropout& d, double p) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return 1.0 / (1.0 - p);
  } else {
    return d.scale;
  }
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& absmax,
    const c10::optional<at::Tensor>& code, int64_t blocksize, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A_in, const at::Tensor& lora_B_in, double scaling, double dropout_p, int64_t seed) {
  constexpr const char* op = "lora_linear_fwd";
  const BaseWeight base{weight, absmax, code, blocksize};
  // float64 (for gradcheck) is supported over a dense base.
  const at::Tensor x2 = check_lora_args(op, x, base, bias, lora_A_in, lora_B_in, dropout_p, !base.is_nf4());
  const at::Tensor lora_A = adapter_as(lora_A_in, x2.scalar_type(), 0), lora_B = adapter_as(lora_B_in, x2.scalar_type(), 1);
  const int64_t M = x2.size(0), K = x2.size(1), R = lora_A.size(0), N = lora_B.size(0);
  at::Tensor y = base_forward(x2, base, N, bias);
  const bool rank_kernels = M > 0 && rank_bf16_applies(x2);
  const bool fused_expand = rank_kernels && rank_bf16_takes(R) && y.is_contiguous();
  at::Tensor u;
  if (M > 0 && y.is_contiguous() && rank_f32_applies(x2, R)) {
    const Dropout d = make_dropout(static_cast<uint64_t>(seed), dropout_p);
    u = rank_shrink_expand_f32(x2, lora_A, dropout_p == 0.0 ? nullptr : &d, y, lora_B, scaling);
    return {y.view(leading_shape_with(x, N)), u};
  }
  if (rank_kernels) {
    const Dropout d = make_dropout(static_cast<uint64_t>(seed), dropout_p);
    const Dropout* dp = dropout_p == 0.0 ? nullptr : &d;
    u = fused_expand ? rank_shrink_expand_bf16(x2, lora_A, dp, &y, &lora_B, scaling) : rank_shrink_bf16(x2, lora_A, dp);
  } else if (dropout_p == 0.0 || M == 0) {
    u = at::mm(x2, lora_A.t());
  } else {
    // u = dropout(x) A^T, row chunk by row chunk.
    u = at::empty({M, R}, x2.options());
    const Dropout d = make_dropout(static_cast<uint64_t>(seed), dropout_p);
    const CpuIsa isa = cpu_isa();
    const int64_t rows = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(K, 1));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), op, [&] {
      [[maybe_unused]] const auto scale = keep_scale<scalar_t>(d, dropout_p);
      const scalar_t* xp = x2.const_data_ptr<scalar_t>();
      // The at:: calls below run on OpenMP worker threads, which start with no thread-local dispatch
      // state: without the caller's (below autograd), at::mm_out sees lora_A requiring grad and throws.
      const at::ThreadLocalState tls;
      at::parallel_for(0, M, rows, [&](int64_t b0, int64_t b1) {
        const at::ThreadLocalStateGuard tls_guard(tls);
        for (int64_t m0 = b0; m0 < b1; m0 += rows) {
          const int64_t mc = std::min(rows, b1 - m0);
          at::Tensor xd = thread_scratch(kChunkSlot, {mc, K}, x2.options());
          scalar_t* xdp = xd.data_ptr<scalar_t>();
          if constexpr (std::is_same_v<scalar_t, double>) {
            std::vector<uint8_t> keep(K);
            for (int64_t m = m0; m < m0 + mc; ++m) {
              const scalar_t* xr = xp + m * K;
              scalar_t* out = xdp + (m - m0) * K;
              dropout_keep_bytes(isa, d, static_cast<uint64_t>(m * K), K, keep.data());
              for (int64_t i = 0; i < K; ++i) out[i] = keep[i] ? xr[i] * scale : 0.0;
            }
          } else {
            // The rows of the chunk are contiguous in x and in xd: one pass.
            dropout_rows(isa, d, static_cast<uint64_t>(m0 * K), mc * K, drop_dt<scalar_t>(), xp + m0 * K, xdp, nullptr,
                         nullptr);
          }
          at::Tensor u_rows = u.narrow(0, m0, mc);
          at::mm_out(u_rows, xd, lora_A.t());
        }
      });
    });
  }
  if (!fused_expand && M > 0) {
    y.addmm_(u, lora_B.t(), 1.0, scaling);
  }
  return {y.view(leading_shape_with(x, N)), u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u, const at::Tensor& weight,
    const c10::optional<at::Tensor>& absmax, const c10::optional<at::Tensor>& code, int64_t blocksize,
    const at::Tensor& lora_A_in, const at::Tensor& lora_B_in, double scaling, double dropout_p, int64_t seed,
    bool need_dx) {
  constexpr const char* op = "lora_linear_bwd";
  const BaseWeight base{weight, absmax, code, blocksize};
  BwdParts p = lora_bwd_common(op, grad, x, u, base, lora_A_in, lora_B_in, scaling, dropout_p, need_dx,
                               !base.is_nf4());
  const at::Tensor &x2 = p.x2, &lora_A = p.lora_A, &gBs = p.gBs;
  const int64_t M = p.M, K = p.K, R = p.R;
  at::Tensor& dx = p.dx;
  at::Tensor dA;
  if (M > 0 && rank_bf16_applies(x2) && rank_bf16_takes(R) && (!need_dx || dx.is_contiguous())) {
    const Dropout d = make_dropout(static_cast<uint64_t>(seed), dropout_p);
    dA = rank_adjoint_bf16(x2, gBs, lora_A, dropout_p == 0.0 ? nullptr : &d, need_dx ? &dx : nullptr);
  } else if (M > 0 && rank_f32_applies(x2, R) && (!need_dx || dx.is_contiguous())) {
    const Dropout d = make_dropout(static_cast<uint64_t>(seed), dropout_p);
    dA = rank_adjoint_f32(x2, gBs, lora_A, dropout_p == 0.0 ? nullptr : &d, need_dx ? &dx : nullptr);
  } else if (dropout_p == 0.0 || M == 0) {
    dA = lora_bwd_no_dropout(p, need_dx);
  } else {
    // Column chunks of x: dA[:, chunk] = gBs^T dropout(x)[:, chunk]; dx[:, chunk] += mask * (gBs A[:, chunk]).
    at::Tensor dAT = at::empty({K, R}, x2.options());
    const Dropout d = make_dropout(static_cast<uint64_t>(seed), dropout_p);
    const CpuIsa isa = cpu_isa();
    const int64_t cols = std::min<int64_t>(K, std::max<int64_t>(16, kChunkElements / M));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), op, [&] {
      using acc_t = opmath<scalar_t>;
      [[maybe_unused]] const auto scale = keep_scale<scalar_t>(d, dropout_p);
      const scalar_t* xp = x2.const_data_ptr<scalar_t>();
      scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
      const at::ThreadLocalState tls;  // the caller's dispatch state for the workers' at:: calls (see the forward)
      at::parallel_for(0, K, cols, [&](int64_t b0, int64_t b1) {
        const at::ThreadLocalStateGuard tls_guard(tls);
        for (int64_t k0 = b0; k0 < b1; k0 += cols) {
          const int64_t kc = std::min(cols, b1 - k0);
          at::Tensor xd = thread_scratch(kChunkSlot, {M, kc}, x2.options());
          at::Tensor t;
          if (need_dx) {
            t = thread_scratch(kChunkSlot2, {M, kc}, x2.options());
            at::mm_out(t, gBs, lora_A.narrow(1, k0, kc));
          }
          scalar_t* xdp = xd.data_ptr<scalar_t>();
          const scalar_t* tp = need_dx ? t.const_data_ptr<scalar_t>() : nullptr;
          std::vector<uint8_t> keep(std::is_same_v<scalar_t, double> ? kc : 0);
          for (int64_t m = 0; m < M; ++m) {
            const scalar_t* xr = xp + m * K + k0;
            scalar_t* xdr = xdp + m * kc;
            scalar_t* dxr = dxp == nullptr ? nullptr : dxp + m * K + k0;
            const scalar_t* tr = dxp == nullptr ? nullptr : tp + m * kc;
            if constexpr (!std::is_same_v<scalar_t, double>) {
              // The rows of a column chunk are K apart: short strided runs that the hardware
              // prefetcher misses, so fetch x's and dx's runs kPrefetchRows rows ahead.
              if (m + kPrefetchRows < M) {
                const char* xn = reinterpret_cast<const char*>(xr + kPrefetchRows * K);
                const char* dn = reinterpret_cast<const char*>(dxr == nullptr ? nullptr : dxr + kPrefetchRows * K);
                for (int64_t b = 0; b < kc * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
                  __builtin_prefetch(xn + b);
                  if (dn != nullptr) __builtin_prefetch(dn + b, 1);
                }
              }
              dropout_rows(isa, d, static_cast<uint64_t>(m * K + k0), kc, drop_dt<scalar_t>(), xr, xdr, tr, dxr);
              continue;
            }
            dropout_keep_bytes(isa, d, static_cast<uint64_t>(m * K + k0), kc, keep.data());
            for (int64_t i = 0; i < kc; ++i) xdr[i] = keep[i] ? static_cast<acc_t>(xr[i]) * scale : acc_t(0);
            if (dxr == nullptr) continue;
            for (int64_t i = 0; i < kc; ++i)
              if (keep[i]) dxr[i] = static_cast<acc_t>(dxr[i]) + static_cast<acc_t>(tr[i]) * scale;
          }
          at::Tensor dA_rows = dAT.narrow(0, k0, kc);
          at::mm_out(dA_rows, xd.t(), gBs);
        }
      });
    });
    dA = dAT.t().contiguous();
  }
  return {need_dx ? dx.view(x.sizes()) : dx, dA.to(lora_A_in.scalar_type()), p.dB.to(lora_B_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CPU, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cpu);
}

}  // namespace lora
}  // namespace peftx
