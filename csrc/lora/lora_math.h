// LoRA math shared by the CPU kernels, the CUDA kernels and the CPU emulation of the CUDA grids.
// Nothing here includes torch.
//
// Dropout masks are a pure function of (seed, element index): Philox4x32-10 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC'11), counter = (e / 8 as 64 bits, 0, 0),
// key = seed (64 bits); each block's four 32-bit words give eight 16-bit uniforms, element e taking
// half e % 2 (low, then high) of word (e % 8) / 2. Element e of the logical [tokens, in_features]
// input is kept when its uniform >= threshold(p), and a kept element is scaled by 1 / (1 - p).
// Forward and backward (and the CPU and CUDA kernels) therefore agree on the mask without storing
// it. Sixteen bits per element halve the Philox work against one word per element; the price is
// that p is resolved to multiples of 2^-16 (dropout_threshold).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace peftx {
namespace lora {

struct Philox4 {
  uint32_t v[4];
};

PEFTX_HD void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds of the counter (c0..c3) under the key (k0, k1).
PEFTX_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  PEFTX_UNROLL
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c0, &hi0, &lo0);
    mulhilo(0xCD9E8D57u, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Elements per Philox block.
constexpr int64_t kDropBlock = 8;

// The four mask words for elements 8q .. 8q+7 under `seed`.
PEFTX_HD Philox4 dropout_words(uint64_t seed, uint64_t q) {
  return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The 16-bit uniform of element j (0..7) of a block.
PEFTX_HD uint32_t dropout_uniform(const Philox4& w, int j) { return (w.v[j >> 1] >> (16 * (j & 1))) & 0xFFFFu; }

// Uniforms below the threshold drop their element: P(drop) = threshold / 2^16, threshold =
// floor(p 2^16), at least 1 for p > 0 (so a p below 2^-16 drops at rate 2^-16 rather than never).
PEFTX_HD uint32_t dropout_threshold(double p) {
  if (p <= 0.0) return 0u;
  const double t = p * 65536.0;
  return t >= 65535.0 ? 65535u : (t < 1.0 ? 1u : static_cast<uint32_t>(t));
}

PEFTX_HD bool dropout_keep(uint64_t seed, uint32_t threshold, uint64_t e) {
  return dropout_uniform(dropout_words(seed, e >> 3), static_cast<int>(e & 7)) >= threshold;
}

// Dropout parameters as the kernels see them: scale = 1 / (1 - p), rounded to fp32 once.
struct Dropout {
  uint64_t seed;
  uint32_t threshold;
  float scale;
};

inline Dropout make_dropout(uint64_t seed, double p) {
  return Dropout{seed, dropout_threshold(p), static_cast<float>(1.0 / (1.0 - p))};
}

// --- per-thread work of the CUDA dropout kernels: one thread per Philox block q, i.e. the eight
// elements 8q .. 8q + 7 (those below n) of a contiguous [rows, cols] tensor, i = m * cols + k ---

// xd[i] = dropout(x)[i].
template <typename T>
PEFTX_HD void dropout_apply_block(int64_t q, const T* x, int64_t n, Dropout d, T* xd) {
  const Philox4 w = dropout_words(d.seed, static_cast<uint64_t>(q));
PEFTX_UNROLL
  for (int e = 0; e < kDropBlock; ++e) {
    const int64_t i = kDropBlock * q + e;
    if (i < n) store(xd + i, dropout_uniform(w, e) >= d.threshold ? mul_rn(to_float(x[i]), d.scale) : 0.0f);
  }
}

// dx[i] += dropout'(t)[i]: the LoRA term of the input gradient, t = s gB A [rows, cols]. The
// adjoint of dropout is the same masked scaling.
template <typename T>
PEFTX_HD void dropout_axpy_block(int64_t q, const T* t, int64_t n, Dropout d, T* dx) {
  const Philox4 w = dropout_words(d.seed, static_cast<uint64_t>(q));
PEFTX_UNROLL
  for (int e = 0; e < kDropBlock; ++e) {
    const int64_t i = kDropBlock * q + e;
    if (i < n && dropout_uniform(w, e) >= d.threshold)
      store(dx + i, add_rn(to_float(dx[i]), mul_rn(to_float(t[i]), d.scale)));
  }
}

// --- mixed-adapter batches (punica's shrink / expand), one thread per output -------------------
// x [M, K]; A [n_adapters, R, K]; B [n_adapters, N, R]; ids [M] int64 (-1: base only); s [n] fp32.

// u[m, j] = sum_k x[m, k] A[ids[m], j, k]  (fp32; 0 for rows without an adapter).
template <typename T>
PEFTX_HD float multi_shrink_one(int64_t m, int64_t j, const T* x, int64_t K, const T* A, int64_t R,
                                const int64_t* ids) {
  const int64_t id = ids[m];
  if (id < 0) return 0.0f;
  const T* xr = x + m * K;
  const T* ar = A + (id * R + j) * K;
  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) acc = add_rn(acc, mul_rn(to_float(xr[k]), to_float(ar[k])));
  return acc;
}

// y[m, n] += s[ids[m]] * sum_j u[m, j] B[ids[m], n, j]  (u fp32 [M, R]).
template <typename T>
PEFTX_HD void multi_expand_one(int64_t m, int64_t n, const float* u, int64_t R, const T* B, int64_t N,
                               const float* s, const int64_t* ids, T* y) {
  const int64_t id = ids[m];
  if (id < 0) return;
  const float* ur = u + m * R;
  const T* br = B + (id * N + n) * R;
  float acc = 0.0f;
  for (int64_t j = 0; j < R; ++j) acc = add_rn(acc, mul_rn(ur[j], to_float(br[j])));
  T* out = y + m * N + n;
  store(out, add_rn(to_float(*out), mul_rn(s[id], acc)));
}

}  // namespace lora
}  // namespace peftx
