#include "lora/rank_f32_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "lora/cpu/rank_f32.h"
#include "lora/rank_host.h"

namespace peftx {
namespace lora {
namespace {

const float* f32(const at::Tensor& t) { return t.const_data_ptr<float>(); }

// dA [R, K] = gBs^T xd ([K, R] if transposed), and dx += D^T(gBs A) where A and dx are given; with
// gf (the dB pass: x = g, gBs = u), dB = g^T fp32(u s) and gBs of g as well (see GbsFused).
at::Tensor adjoint(const at::Tensor& x2, const at::Tensor& gBs, const at::Tensor* A, const Dropout* d,
                   at::Tensor* dx, bool transposed = false, const GbsFused* gf = nullptr) {
  const int64_t M = x2.size(0), K = x2.size(1), R = gBs.size(1), RV = cpu::rank_f32_padded(R);
  at::Tensor Ac;
  if (A != nullptr) Ac = A->contiguous();
  // gBs's rows padded to RV ranks (zeros past R; scaled by gf->s in the dB pass, as u.mul(s)).
  thread_local std::vector<float> gpad_buf;
  float* gpad = scratch(gpad_buf, static_cast<size_t>(M * RV));
  cpu::pad_cols_f32(f32(gBs.contiguous()), M, R, gf != nullptr ? static_cast<float>(gf->s) : 1.0f, RV, gpad);
  at::Tensor dA = transposed ? at::empty({K, R}, x2.options()) : at::empty({R, K}, x2.options());
  float* dAp = dA.data_ptr<float>();
  float* dxp = dx != nullptr ? dx->data_ptr<float>() : nullptr;
  const float* ap = A != nullptr ? f32(Ac) : nullptr;
  const int64_t cols = adjoint_chunk_cols(M, K, sizeof(float), cpu::kMaxAdjointColsF32);
  thread_local std::vector<float> Bq_buf;
  float* Bq = nullptr;
  ThreadPartials gacc;
  if (gf != nullptr) {
    Bq = scratch(Bq_buf, static_cast<size_t>(K * 16));
    cpu::pad_cols_f32(f32(gf->B.contiguous()), K, gf->B.size(1), 1.0f, 16, Bq);
    gacc = thread_partials(M);
  }
  at::parallel_for(0, (K + cols - 1) / cols, 1, [&](int64_t c0, int64_t c1) {
    thread_local std::vector<uint64_t> bits_buf;
    thread_local std::vector<float> pk_buf;
    uint64_t* bits = scratch(bits_buf, static_cast<size_t>(2 * ((cols + 63) / 64)));
    float* pk = scratch(pk_buf, static_cast<size_t>(M * 16 * ((cols + 15) / 16)));
    const cpu::GbsPartialF32 part{Bq, gf != nullptr ? gacc.mine() : nullptr};
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = c * cols, k1 = std::min(K, k0 + cols);
      cpu::adjoint_f32(d, f32(x2), M, K, k0, k1, gpad, ap, R, dAp, transposed, dxp, bits, pk,
                       gf != nullptr ? &part : nullptr);
    }
  });
  if (gf != nullptr) {
    gf->gBs = at::empty({M, gf->B.size(1)}, x2.options());
    cpu::gbs_from_partials_f32(gacc.acc, gacc.threads, M, gf->B.size(1), static_cast<float>(gf->s), gf->gBs.data_ptr<float>());
  }
  return dA;
}

}  // namespace

bool rank_f32_applies(const at::Tensor& x2, int64_t rank) {
  return x2.is_cpu() && x2.scalar_type() == at::kFloat && rank <= cpu::kMaxRankF32 && cpu::rank_f32_supported();
}

at::Tensor rank_shrink_expand_f32(const at::Tensor& x2, const at::Tensor& A_in, const Dropout* d, at::Tensor& y2,
                                  const at::Tensor& B_in, double s) {
  const int64_t M = x2.size(0), K = x2.size(1), R = A_in.size(0), N = y2.size(1);
  const at::Tensor A = A_in.contiguous(), B = B_in.contiguous();
  at::Tensor u = at::empty({M, R}, x2.options());
  float* up = u.data_ptr<float>();
  thread_local std::vector<float> BT_buf;
  float* BT = scratch(BT_buf, static_cast<size_t>(R * N));
  cpu::transpose_f32(f32(B), N, R, BT);
  float* yp = y2.data_ptr<float>();
  // Groups of 4 rows (the kernels' tile) per task; a task's expand reads only the u rows its own
  // shrink wrote, so both run in one parallel region.
  at::parallel_for(0, (M + 3) / 4, 1, [&](int64_t g0, int64_t g1) {
    thread_local std::vector<float> buf_buf;
    thread_local std::vector<uint64_t> bits_buf;
    float* buf = d != nullptr ? scratch(buf_buf, static_cast<size_t>(4 * K)) : nullptr;
    uint64_t* bits = d != nullptr ? scratch(bits_buf, static_cast<size_t>(4 * ((K + 63) / 64))) : nullptr;
    const int64_t m0 = g0 * 4, m1 = std::min(M, g1 * 4);
    cpu::shrink_f32(d, f32(x2), m0, m1, K, f32(A), R, buf, bits, up);
    cpu::expand_f32(up, m0, m1, R, BT, N, static_cast<float>(s), yp);
  });
  return u;
}

at::Tensor rank_adjoint_f32(const at::Tensor& x2, const at::Tensor& gBs, const at::Tensor& A, const Dropout* d,
                            at::Tensor* dx) {
  return adjoint(x2, gBs, &A, d, dx);
}

std::pair<at::Tensor, at::Tensor> rank_gbs_gt_u_f32(const at::Tensor& g2, const at::Tensor& B, const at::Tensor& u,
                                                    double s) {
  at::Tensor gBs;
  const GbsFused gf{B, s, gBs};
  at::Tensor dB = adjoint(g2, u, nullptr, nullptr, nullptr, /*transposed=*/true, &gf);
  return {gBs, dB};
}

}  // namespace lora
}  // namespace peftx
