// CPU kernel of the mixed-adapter LoRA forward. Rows are grouped by adapter (a counting sort of
// adapter_ids). Where each adapter's rows form one slice, the slice runs two GEMMs (punica's
// segmented shrink/expand). Otherwise fp32 rows run a fused shrink + expand, kRows rows of one
// adapter at a time against its factors transposed to fp32 once per call (unit-stride vector FMAs
// over r and over out_features, compiled for AVX-512 / AVX2 / SSE and chosen by cpu_isa()), and
// 16-bit rows gather each adapter's rows for the library's GEMMs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/dispatch.h"

#include "lora/cpu/multi_rows_bf16.h"
#include "lora/lora_base.h"

namespace peftx {
namespace lora {
namespace {

// --- the per-row kernel: written once, compiled for each instruction set -----------------------
// Conversions of 16-bit types are bit operations, so
// they vectorize too (bf16 rounds to nearest even, NaN stays NaN; fp16 goes through to_float/store).

template <typename T>
__attribute__((always_inline)) inline float load_one(const T& v) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return bits_float(static_cast<uint32_t>(v.bits) << 16);
  } else {
    return to_float(v);
  }
}

template <typename T>
__attribute__((always_inline)) inline void store_one(T* p, float f) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    const uint32_t u = float_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x40u;
    p->bits = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
  } else {
    store(p, f);
  }
}

// The vector helpers are always inlined into the ISA-specific kernels, so no vector value ever
// crosses a call boundary and the psABI note about wide vector returns does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// W fp32 lanes as a GCC vector: W = 16 (one zmm) for AVX-512, 8 (one ymm) for AVX2, 4 (SSE) else.
template <int W>
struct Vec {
  typedef float type __attribute__((vector_size(W * 4)));
};

template <int W>
__attribute__((always_inline)) inline typename Vec<W>::type load_v(const float* p) {
  typename Vec<W>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

constexpr int kRows = 4;  // rows of one adapter processed together: each factor load serves 4 rows

// For up to kRows rows of one adapter: y[i] += s * (x[i] A^T) B^T, AT [K, R] and BT [R, N] fp32;
// xf [kRows * K] and u [kRows * R] scratch. Missing rows (nrows < kRows) repeat row 0, unstored.
template <int W, typename T>
__attribute__((always_inline)) inline void rows_impl(const T* const* x, T* const* y, int nrows, int64_t K,
                                                     const float* AT, int64_t R, const float* BT, int64_t N,
                                                     float s, float* xf, float* u) {
  using V = typename Vec<W>::type;
  for (int i = 0; i < kRows; ++i) {
    const T* xi = x[i < nrows ? i : 0];
    for (int64_t k = 0; k < K; ++k) xf[i * K + k] = load_one(xi[k]);
  }
  const float *x0 = xf, *x1 = xf + K, *x2 = xf + 2 * K, *x3 = xf + 3 * K;
  int64_t j0 = 0;
  for (; j0 + W <= R; j0 += W) {  // u = s x A^T, W ranks of 4 rows per pass over AT
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t k = 0; k < K; ++k) {
      const V a = load_v<W>(AT + k * R + j0);
      a0 += x0[k] * a;
      a1 += x1[k] * a;
      a2 += x2[k] * a;
      a3 += x3[k] * a;
    }
    for (int t = 0; t < W; ++t) {
      u[j0 + t] = s * a0[t];
      u[R + j0 + t] = s * a1[t];
      u[2 * R + j0 + t] = s * a2[t];
      u[3 * R + j0 + t] = s * a3[t];
    }
  }
  for (; j0 < R; ++j0)
    for (int i = 0; i < kRows; ++i) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += xf[i * K + k] * AT[k * R + j0];
      u[i * R + j0] = s * acc;
    }
  int64_t n0 = 0;
  for (; n0 + 2 * W <= N; n0 += 2 * W) {  // y += u B^T, 2W outputs of 4 rows per pass over BT
    V c[kRows][2] = {};
    for (int64_t j = 0; j < R; ++j) {
      const V b0 = load_v<W>(BT + j * N + n0), b1 = load_v<W>(BT + j * N + n0 + W);
      for (int i = 0; i < kRows; ++i) {
        c[i][0] += u[i * R + j] * b0;
        c[i][1] += u[i * R + j] * b1;
      }
    }
    for (int i = 0; i < nrows; ++i)
      for (int t = 0; t < W; ++t) {
        store_one(y[i] + n0 + t, load_one(y[i][n0 + t]) + c[i][0][t]);
        store_one(y[i] + n0 + W + t, load_one(y[i][n0 + W + t]) + c[i][1][t]);
      }
  }
  for (int64_t n = n0; n < N; ++n)
    for (int i = 0; i < nrows; ++i) {
      float acc = 0.0f;
      for (int64_t j = 0; j < R; ++j) acc += u[i * R + j] * BT[j * N + n];
      store_one(y[i] + n, load_one(y[i][n]) + acc);
    }
}

template <typename T>
using RowsFn = void (*)(const T* const*, T* const*, int, int64_t, const float*, int64_t, const float*, int64_t, float,
                        float*, float*);

#define PEFTX_ROWS_KERNEL(name, width, attr)                                                             \
  template <typename T>                                                                                  \
  attr void name(const T* const* x, T* const* y, int nrows, int64_t K, const float* AT, int64_t R,       \
                 const float* BT, int64_t N, float s, float* xf, float* u) {                             \
    rows_impl<width>(x, y, nrows, K, AT, R, BT, N, s, xf, u);                                            \
  }
PEFTX_ROWS_KERNEL(rows_avx512, 16, __attribute__((target("avx512f,avx512vl,avx512bw,fma"))))
PEFTX_ROWS_KERNEL(rows_avx2, 8, __attribute__((target("avx2,fma"))))
PEFTX_ROWS_KERNEL(rows_scalar, 4, )
#undef PEFTX_ROWS_KERNEL

template <typename T>
RowsFn<T> rows_kernel() {
  switch (cpu_isa()) {
    case CpuIsa::avx512:
      return rows_avx512<T>;
    case CpuIsa::avx2:
      return rows_avx2<T>;
    default:
      return rows_scalar<T>;
  }
}

// Interleaved adapters: rows grouped by adapter (rows[start[a] .. start[a + 1])), kRows at a time,
// so each adapter's factors stream through the cache once per group rather than once per row.
void multi_rows(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B, const float* sp,
                const std::vector<int64_t>& start, const std::vector<int64_t>& rows, at::Tensor& y) {
  const int64_t K = x2.size(1), R = lora_A.size(1), N = lora_B.size(1), n = lora_A.size(0);
  const at::Tensor AT = lora_A.to(at::kFloat).transpose(1, 2).contiguous();  // [n, K, R]
  const at::Tensor BT = lora_B.to(at::kFloat).transpose(1, 2).contiguous();  // [n, R, N]
  const float* atp = AT.const_data_ptr<float>();
  const float* btp = BT.const_data_ptr<float>();
  std::vector<std::pair<int64_t, int64_t>> groups;  // (adapter, first index into rows)
  for (int64_t a = 0; a < n; ++a)
    for (int64_t i = start[a]; i < start[a + 1]; i += kRows) groups.emplace_back(a, i);
  dispatch_float(x2.scalar_type(), "lora_multi_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RowsFn<T> kernel = rows_kernel<T>();
    const T* xp = reinterpret_cast<const T*>(x2.const_data_ptr());
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t g0, int64_t g1) {
      std::vector<float> xf(kRows * K), u(kRows * R);
      for (int64_t g = g0; g < g1; ++g) {
        const auto [a, first] = groups[g];
        const int nrows = static_cast<int>(std::min<int64_t>(kRows, start[a + 1] - first));
        const T* xs[kRows];
        T* ys[kRows];
        for (int i = 0; i < kRows; ++i) {
          const int64_t m = rows[first + (i < nrows ? i : 0)];
          xs[i] = xp + m * K;
          ys[i] = yp + m * N;
        }
        kernel(xs, ys, nrows, K, atp + a * K * R, R, btp + a * R * N, N, sp[a], xf.data(), u.data());
      }
    });
  });
}

// Interleaved bf16 adapters on AVX-512 BF16 CPUs: the vdpbf16ps row kernel (lora/cpu/multi_rows_bf16.h),
// kRows rows of one adapter at a time, B repacked once per call as rank pairs per output.
bool multi_rows_bf16_applies(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  return x2.scalar_type() == at::kBFloat16 && cpu_isa() == CpuIsa::avx512 && cpu_has_avx512bf16() &&
         x2.size(1) % 32 == 0 && lora_B.size(1) % 32 == 0 && lora_A.size(1) <= 64;
}

// Writes every row of y: base_out's plus the term for rows with an adapter, base_out's alone for
// the others (no separate copy of base_out first).
void multi_rows_bf16(const at::Tensor& x2, const at::Tensor& base_out, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, const float* sp, const std::vector<int64_t>& start,
                     const std::vector<int64_t>& rows, const int64_t* ids, at::Tensor& y) {
  const int64_t K = x2.size(1), R = lora_A.size(1), N = lora_B.size(1), n = lora_A.size(0), R2 = (R + 1) / 2;
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
  const auto* xp = static_cast<const uint16_t*>(x2.const_data_ptr());
  const auto* ap = static_cast<const uint16_t*>(A.const_data_ptr());
  const auto* bsrc = static_cast<const uint16_t*>(B.const_data_ptr());
  const auto* basep = static_cast<const uint16_t*>(base_out.const_data_ptr());
  auto* yp = static_cast<uint16_t*>(y.data_ptr());
  const int64_t M = x2.size(0);
  for (int64_t m = 0; m < M; ++m)
    if (ids[m] < 0) std::copy_n(basep + m * N, N, yp + m * N);
  std::vector<std::pair<int64_t, int64_t>> groups;  // (adapter, first index into rows)
  for (int64_t a = 0; a < n; ++a)
    for (int64_t i = start[a]; i < start[a + 1]; i += kRows) groups.emplace_back(a, i);
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t g0, int64_t g1) {
    // B[a] as rank pairs per output, BTp[j][n] = (B[a][n, 2 j], B[a][n, 2 j + 1]), packed by each task
    // for the adapters its groups use (groups are ordered by adapter).
    std::vector<uint32_t> btp(static_cast<size_t>(R2 * N));
    int64_t packed = -1;
    for (int64_t g = g0; g < g1; ++g) {
      const auto [a, first] = groups[g];
      if (a != packed) {
        const uint16_t* b = bsrc + a * N * R;
        for (int64_t nn = 0; nn < N; ++nn)
          for (int64_t j = 0; j < R2; ++j) {
            const uint32_t lo = b[nn * R + 2 * j], hi = 2 * j + 1 < R ? b[nn * R + 2 * j + 1] : 0u;
            btp[j * N + nn] = lo | (hi << 16);
          }
        packed = a;
      }
      const int nrows = static_cast<int>(std::min<int64_t>(kRows, start[a + 1] - first));
      cpu::multi_rows_bf16(xp, K, rows.data() + first, nrows, ap + a * R * K, R, btp.data(), N, sp[a], basep, yp);
    }
  });
}

// y = base_out + s[id] (x A[id]^T) B[id]^T per row; rows with id -1 keep base_out.
at::Tensor lora_multi_fwd_cpu(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                              const at::Tensor& lora_B, const at::Tensor& scalings,
                              const at::Tensor& adapter_ids) {
  constexpr const char* op = "lora_multi_fwd";
  // A forward-only op (no autograd formula): its inner ATen calls run as plain kernels even where the
  // caller's stacked adapters require grad (some torch versions dispatch this op above autograd).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x2 = check_multi_args(op, x, base_out, lora_A, lora_B, scalings, adapter_ids);
  const int64_t M = x2.size(0), n = lora_A.size(0), N = lora_B.size(1);
  const at::Tensor ids = adapter_ids.contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  // Counting sort of the rows by adapter: rows[start[a] .. start[a + 1]) use adapter a.
  std::vector<int64_t> start(n + 1, 0), rows;
  for (int64_t m = 0; m < M; ++m)
    if (idp[m] >= 0) ++start[idp[m] + 1];
  for (int64_t a = 0; a < n; ++a) start[a + 1] += start[a];
  rows.resize(start[n]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t m = 0; m < M; ++m)
    if (idp[m] >= 0) rows[fill[idp[m]]++] = m;
  const float* sp = scalings.const_data_ptr<float>();
  bool sliced = true;
  for (int64_t a = 0; a < n && sliced; ++a) {
    const int64_t count = start[a + 1] - start[a];
    sliced = count == 0 || rows[start[a + 1] - 1] - rows[start[a]] == count - 1;
  }
  // Interleaved fp32 rows: the fused row kernel (as fast as the one-adapter GEMM here); bf16 rows on
  // AVX-512 BF16: the vdpbf16ps row kernel. Other 16-bit rows: gathered GEMMs, since the library's
  // bf16/fp16 GEMMs beat an fp32-accumulating row kernel.
  if (!sliced && multi_rows_bf16_applies(x2, lora_A, lora_B)) {
    const at::Tensor base2 = base_out.reshape({M, N}).contiguous();
    at::Tensor y = at::empty({M, N}, base_out.options());
    multi_rows_bf16(x2, base2, lora_A, lora_B, sp, start, rows, idp, y);
    return y.view(base_out.sizes());
  }
  at::Tensor y = base_out.reshape({M, N}).clone(at::MemoryFormat::Contiguous);
  if (!sliced && x2.scalar_type() == at::kFloat) {
    multi_rows(x2, lora_A, lora_B, sp, start, rows, y);
    return y.view(base_out.sizes());
  }
  if (!sliced) {
    // 16-bit activations: gather each adapter's rows and use the library's 16-bit GEMMs.
    const at::ThreadLocalState tls;  // OpenMP workers start without the caller's (below-autograd) dispatch state
    at::parallel_for(0, n, 1, [&](int64_t a0, int64_t a1) {
      const at::ThreadLocalStateGuard tls_guard(tls);
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t count = start[a + 1] - start[a];
        if (count == 0) continue;
        const at::Tensor idx = at::from_blob(rows.data() + start[a], {count}, at::kLong);
        const at::Tensor u = at::mm(x2.index_select(0, idx), lora_A[a].t());
        y.index_add_(0, idx, at::mm(u, lora_B[a].t()), sp[a]);
      }
    });
    return y.view(base_out.sizes());
  }
  // Each adapter's rows are one slice: two GEMMs per adapter, no gather or scatter.
  const at::ThreadLocalState tls;  // as above
  at::parallel_for(0, n, 1, [&](int64_t a0, int64_t a1) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t count = start[a + 1] - start[a];
      if (count == 0) continue;
      const int64_t m0 = rows[start[a]];
      const at::Tensor u = at::mm(x2.narrow(0, m0, count), lora_A[a].t());
      y.narrow(0, m0, count).addmm_(u, lora_B[a].t(), 1.0, sp[a]);
    }
  });
  return y.view(base_out.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx, CPU, m) { m.impl("lora_multi_fwd", &lora_multi_fwd_cpu); }

}  // namespace lora
}  // namespace peftx
