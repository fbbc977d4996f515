// CPU emulation of the NF4 CUDA grids (test-only ops in the peftx_emulate namespace). Each op walks
// every (blockIdx, threadIdx) of the launch its CUDA twin in nf4_cuda.cu would make, applies the
// kernel's bounds test, and calls the same per-thread function from nf4_math.h. The GEMV emulation
// sums the 32 lane partials in the warp shuffle's order, so it reproduces the device result bit
// for bit (up to the device's own fp32 arithmetic, which is IEEE as on the host).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "common/dispatch.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace nf4 {
namespace {

// Calls fn(thread_index) for every thread of a 1-D launch covering `work` items, `per_block` items
// per block of kCudaThreads threads, in grid order.
template <typename Fn>
void for_each_thread(int64_t work, int64_t per_block, Fn&& fn) {
  const int64_t grid = (work + per_block - 1) / per_block;
  for (int64_t block = 0; block < grid; ++block)
    for (int64_t thread = 0; thread < kCudaThreads; ++thread) fn(block * kCudaThreads + thread);
}

std::tuple<at::Tensor, at::Tensor> quantize_grid(const at::Tensor& weight, int64_t blocksize) {
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.numel(), blocks = num_blocks(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, w.options().dtype(at::kFloat));
  dispatch_float(w.scalar_type(), "emulate nf4_quantize", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = reinterpret_cast<const T*>(w.const_data_ptr());
    for_each_thread(blocks, kCudaThreads, [&](int64_t t) {
      if (t < blocks) quantize_block(t, src, n, blocksize, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
    });
  });
  return {packed, absmax};
}

at::Tensor dequantize_grid(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                           int64_t blocksize, int64_t n, at::ScalarType dtype) {
  at::Tensor out = at::empty({n}, packed.options().dtype(dtype));
  const int64_t bytes = (n + 1) / 2;
  dispatch_float(dtype, "emulate nf4_dequantize", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = reinterpret_cast<T*>(out.data_ptr());
    for_each_thread(bytes, kCudaThreads, [&](int64_t t) {
      if (t < bytes)
        dequantize_byte(t, packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(),
                        code.const_data_ptr<float>(), blocksize, n, dst);
    });
  });
  return out;
}

at::Tensor dequantize8_grid(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                            int64_t blocksize, int64_t n, at::ScalarType dtype) {
  at::Tensor out = at::empty({n}, packed.options().dtype(dtype));
  const int64_t octs = (n + 7) / 8;
  const int bshift = block_shift(blocksize);
  dispatch_float(dtype, "emulate nf4_dequantize8", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = reinterpret_cast<T*>(out.data_ptr());
    for_each_thread(octs, kCudaThreads, [&](int64_t t) {
      if (t < octs)
        dequantize_oct(t, packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(),
                       code.const_data_ptr<float>(), blocksize, bshift, n, dst);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> double_quantize_grid(const at::Tensor& x, const at::Tensor& code,
                                                        int64_t blocksize) {
  const int64_t n = x.numel(), blocks = num_blocks(n, blocksize);
  at::Tensor q = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor nested = at::empty({blocks}, x.options());
  for_each_thread(blocks, kCudaThreads, [&](int64_t t) {
    if (t < blocks)
      quantize8_block(t, x.const_data_ptr<float>(), n, blocksize, code.const_data_ptr<float>(),
                      q.data_ptr<uint8_t>(), nested.data_ptr<float>());
  });
  return {q, nested};
}

at::Tensor double_dequantize_grid(const at::Tensor& q, const at::Tensor& nested, const at::Tensor& code,
                                  const at::Tensor& offset, int64_t blocksize) {
  const int64_t n = q.numel();
  at::Tensor out = at::empty({n}, nested.options());
  const float off = offset.item<float>();
  for_each_thread(n, kCudaThreads, [&](int64_t t) {
    if (t < n)
      out.data_ptr<float>()[t] = decode_absmax(t, q.const_data_ptr<uint8_t>(), nested.const_data_ptr<float>(),
                                               code.const_data_ptr<float>(), blocksize, off);
  });
  return out;
}

at::Tensor gemv_grid(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const at::Tensor& code, int64_t blocksize, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 8 == 0, "emulate nf4_gemv: the kernel takes in_features % 8 == 0, got ", K);
  at::Tensor y = at::full({M, N}, std::numeric_limits<float>::quiet_NaN(), x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const int bshift = block_shift(blocksize);
  constexpr int64_t warps_per_block = kCudaThreads / kWarp;
  const int64_t grid_x = (N + warps_per_block - 1) / warps_per_block;
  const int64_t grid_y = (M + kGemvWarpRows - 1) / kGemvWarpRows;
  dispatch_float(x.scalar_type(), "emulate nf4_gemv", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
    std::array<std::array<float, kWarp>, kGemvWarpRows> lanes{};
    for (int64_t by = 0; by < grid_y; ++by)
      for (int64_t bx = 0; bx < grid_x; ++bx)
        for (int64_t w = 0; w < warps_per_block; ++w) {
          const int64_t o = bx * warps_per_block + w, m0 = by * kGemvWarpRows;
          if (o >= N) continue;  // the kernel's per-warp bounds test
          for (int lane = 0; lane < kWarp; ++lane) {
            float acc[kGemvWarpRows];
            gemv_lane_partials(m0, M, o, lane, xp, K, packed.const_data_ptr<uint8_t>(),
                               absmax.const_data_ptr<float>(), code.const_data_ptr<float>(), bshift, acc);
            for (int r = 0; r < kGemvWarpRows; ++r) lanes[r][lane] = acc[r];
          }
          for (int r = 0; r < kGemvWarpRows; ++r)
            if (m0 + r < M) yp[(m0 + r) * N + o] = warp_tree_sum(lanes[r].data());
        }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(peftx_emulate, CPU, m) {
  m.impl("nf4_quantize_kernel", &quantize_grid);
  m.impl("nf4_dequantize_kernel", &dequantize_grid);
  m.impl("nf4_dequantize8_kernel", &dequantize8_grid);
  m.impl("nf4_double_quantize_kernel", &double_quantize_grid);
  m.impl("nf4_double_dequantize_kernel", &double_dequantize_grid);
  m.impl("nf4_gemv_kernel", &gemv_grid);
}

}  // namespace nf4
}  // namespace peftx
