#include "lora/rank_bf16_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "lora/cpu/rank_bf16.h"
#include "lora/rank_host.h"

namespace peftx {
namespace lora {
namespace {

const uint16_t* bf16_ptr(const at::Tensor& t) { return static_cast<const uint16_t*>(t.const_data_ptr()); }

// The packed rows' buffer, in whole 64-byte lines.
struct alignas(64) Line {
  uint32_t v[16];
};

}  // namespace

bool rank_bf16_applies(const at::Tensor& x2) {
  return x2.is_cpu() && x2.scalar_type() == at::kBFloat16 && cpu::rank_bf16_supported();
}

at::Tensor rank_shrink_bf16(const at::Tensor& x2, const at::Tensor& A, const Dropout* d) {
  return rank_shrink_expand_bf16(x2, A, d, nullptr, nullptr, 0.0);
}

at::Tensor rank_shrink_expand_bf16(const at::Tensor& x2, const at::Tensor& A_in, const Dropout* d, at::Tensor* y2,
                                   const at::Tensor* B, double s) {
  const int64_t M = x2.size(0), K = x2.size(1), R = A_in.size(0), N = y2 != nullptr ? y2->size(1) : 0;
  const at::Tensor A = A_in.contiguous();
  at::Tensor u = at::empty({M, R}, x2.options());
  uint16_t* up = static_cast<uint16_t*>(u.data_ptr());
  thread_local std::vector<uint32_t> BTp_buf;  // B^T as rank pairs
  uint32_t* BTp = nullptr;
  if (y2 != nullptr) {
    const at::Tensor Bc = B->contiguous();
    BTp = scratch(BTp_buf, static_cast<size_t>((R + 1) / 2 * N));
    cpu::pack_rank_pairs_t_bf16(bf16_ptr(Bc), N, R, BTp);
  }
  uint16_t* yp = y2 != nullptr ? static_cast<uint16_t*>(y2->data_ptr()) : nullptr;
  // Groups of 4 rows (the kernels' tile) per task; a task's expand reads only the u rows its own
  // shrink wrote, so both run in one parallel region.
  at::parallel_for(0, (M + 3) / 4, 1, [&](int64_t g0, int64_t g1) {
    thread_local std::vector<uint16_t> buf_buf;
    thread_local std::vector<uint64_t> bits_buf;
    uint16_t* buf = d != nullptr ? scratch(buf_buf, static_cast<size_t>(4 * K)) : nullptr;
    uint64_t* bits = d != nullptr ? scratch(bits_buf, static_cast<size_t>(4 * ((K + 63) / 64))) : nullptr;
    const int64_t m0 = g0 * 4, m1 = std::min(M, g1 * 4);
    cpu::shrink_bf16(d, bf16_ptr(x2), m0, m1, K, bf16_ptr(A), R, buf, bits, up);
    if (yp != nullptr) cpu::expand_bf16(up, m0, m1, R, BTp, N, static_cast<float>(s), yp);
  });
  return u;
}

bool rank_bf16_takes(int64_t rank) { return rank <= cpu::kMaxRank; }

namespace {

// dA [R, K] fp32 = gBs^T xd ([K, R] if transposed), and dx += D^T(gBs A) where A and dx are given;
// with gf (the dB pass: x = g, gBs = u), dB = g^T bf16(u s) and gBs of g as well (see GbsFused).
at::Tensor adjoint(const at::Tensor& x2, const at::Tensor& gBs, const at::Tensor* A, const Dropout* d,
                   at::Tensor* dx, bool transposed = false, const GbsFused* gf = nullptr) {
  const int64_t M = x2.size(0), K = x2.size(1), R = gBs.size(1), R2 = R + (R & 1), Mh = (M + 1) / 2;
  at::Tensor Ac;
  if (A != nullptr) Ac = A->contiguous();
  // The kernel reads gBs's rows as rank pairs (a zero column for odd R; only for dx's term) and its
  // columns as row pairs (gT; scaled by gf->s in the dB pass, whose gBs argument is u).
  at::Tensor g;
  if (dx != nullptr) g = R2 == R ? gBs.contiguous() : at::constant_pad_nd(gBs, {0, 1});
  const uint16_t* gp = dx != nullptr ? bf16_ptr(g) : nullptr;
  const at::Tensor gc = gBs.contiguous();
  thread_local std::vector<uint32_t> gT_buf;
  uint32_t* gT = scratch(gT_buf, static_cast<size_t>(Mh * R2));
  const float us_scale = gf != nullptr ? static_cast<float>(gf->s) : 1.0f;
  cpu::pack_row_pairs_t_bf16(bf16_ptr(gc), M, R, gf != nullptr ? &us_scale : nullptr, R2, gT);
  at::Tensor dA = transposed ? at::empty({K, R}, x2.options().dtype(at::kFloat))
                             : at::empty({R, K}, x2.options().dtype(at::kFloat));
  float* dAp = dA.data_ptr<float>();
  uint16_t* dxp = dx != nullptr ? static_cast<uint16_t*>(dx->data_ptr()) : nullptr;
  const uint16_t* ap = A != nullptr ? bf16_ptr(Ac) : nullptr;
  const int64_t cols = adjoint_chunk_cols(M, K, sizeof(uint16_t), cpu::kMaxAdjointCols);
  thread_local std::vector<uint32_t> Bp_buf;
  uint32_t* Bp = nullptr;
  ThreadPartials gacc;
  if (gf != nullptr) {
    const at::Tensor B = gf->B.contiguous();
    Bp = scratch(Bp_buf, static_cast<size_t>((K + 1) / 2 * 16));
    cpu::pack_row_pairs_bf16(bf16_ptr(B), K, gf->B.size(1), Bp);
    gacc = thread_partials(M);
  }
  at::parallel_for(0, (K + cols - 1) / cols, 1, [&](int64_t c0, int64_t c1) {
    thread_local std::vector<uint64_t> bits_buf;
    thread_local std::vector<Line> pk_buf;
    uint64_t* bits = scratch(bits_buf, static_cast<size_t>(2 * ((cols + 63) / 64)));
    uint32_t* pk = reinterpret_cast<uint32_t*>(scratch(pk_buf, static_cast<size_t>((cols + 15) / 16 * Mh)));
    const cpu::GbsPartial part{Bp, gf != nullptr ? gacc.mine() : nullptr};
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = c * cols, k1 = std::min(K, k0 + cols);
      cpu::adjoint_bf16(d, bf16_ptr(x2), M, K, k0, k1, gp, gT, ap, R, dAp, transposed, dxp, bits, pk,
                        gf != nullptr ? &part : nullptr);
    }
  });
  if (gf != nullptr) {
    gf->gBs = at::empty({M, gf->B.size(1)}, x2.options());
    cpu::gbs_from_partials(gacc.acc, gacc.threads, M, gf->B.size(1), static_cast<float>(gf->s),
                           static_cast<uint16_t*>(gf->gBs.data_ptr()));
  }
  return dA;
}

}  // namespace

at::Tensor rank_adjoint_bf16(const at::Tensor& x2, const at::Tensor& gBs, const at::Tensor& A, const Dropout* d,
                             at::Tensor* dx) {
  return adjoint(x2, gBs, &A, d, dx);
}

std::pair<at::Tensor, at::Tensor> rank_gbs_gt_u_bf16(const at::Tensor& g2, const at::Tensor& B, const at::Tensor& u,
                                                     double s) {
  at::Tensor gBs;
  const GbsFused gf{B, s, gBs};
  at::Tensor dB = adjoint(g2, u, nullptr, nullptr, nullptr, /*transposed=*/true, &gf);
  return {gBs, dB};
}

}  // namespace lora
}  // namespace peftx
