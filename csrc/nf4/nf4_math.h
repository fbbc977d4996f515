// The NF4 format, exactly as bitsandbytes 0.50 defines it, and the per-element / per-thread work of
// every NF4 kernel. Included by the CPU kernels, the CUDA kernels and the CPU emulation of the CUDA
// grid, so each table and formula below exists exactly once.
//
// Storage of a weight W with n = rows * cols elements (bitsandbytes' blocking is over the flattened
// tensor, so a block may straddle rows when cols % blocksize != 0):
//   packed[i]  uint8, i in [0, ceil(n / 2)): element 2i in the high nibble, 2i + 1 in the low nibble
//              (a zero low nibble pads an odd n);
//   absmax[b]  fp32, b in [0, ceil(n / blocksize)): max |W| over block b;
//   W[j] ~= code[nibble(j)] * absmax[j / blocksize].
// Double quantization stores absmax as uint8 codes of the 8-bit dynamic map, blockwise over
// nested_blocksize (256) values of (absmax - offset), offset = mean(absmax):
//   absmax[b] = dynamic[qabsmax[b]] * nested_absmax[b / 256] + offset   (two roundings, no FMA).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace peftx {
namespace nf4 {

// bitsandbytes' NF4 code book (functional.get_4bit_type("nf4")), as exact fp32 bit patterns.
#define PEFTX_NF4_CODE \
    -0x1.0p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.94654p-2f, \
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0.0p+0f, \
    0x1.45f5fep-4f, 0x1.4995c6p-3f, 0x1.f809bap-3f, 0x1.5a0674p-2f, \
    0x1.c3497p-2f, 0x1.200f56p-1f, 0x1.722766p-1f, 0x1.0p+0f
constexpr float kCode[16] = {PEFTX_NF4_CODE};
#if defined(__CUDACC__)
static __constant__ float kCodeDevice[16] = {PEFTX_NF4_CODE};
#endif

// Decision boundaries of the encoder: fp32 (kCode[i] + kCode[i + 1]) / 2, as bitsandbytes'
// bucketize bounds. A value equal to a boundary takes the lower code.
#define PEFTX_NF4_MIDPOINTS \
    -0x1.b239bp-1f, -0x1.38a4ep-1f, -0x1.d709p-2f, -0x1.5bd4ecp-2f, \
    -0x1.e079d8p-3f, -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f, \
    0x1.ec90c4p-4f, 0x1.a0cfcp-3f, 0x1.2b05a8p-2f, 0x1.8ea7f2p-2f, \
    0x1.00da08p-1f, 0x1.491b5ep-1f, 0x1.b913b4p-1f
constexpr float kMidpoints[15] = {PEFTX_NF4_MIDPOINTS};
#if defined(__CUDACC__)
static __constant__ float kMidpointsDevice[15] = {PEFTX_NF4_MIDPOINTS};
#endif

// bitsandbytes' 8-bit dynamic map (functional.create_dynamic_map(signed=True)): the code book of
// the double quantization. Sorted ascending.
#define PEFTX_DYNAMIC_CODE \
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, \
    -0x1.df999ap-1f, -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.cap-1f, \
    -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f, \
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f, \
    -0x1.893334p-1f, -0x1.82p-1f, -0x1.7accccp-1f, -0x1.73999ap-1f, \
    -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f, \
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f, \
    -0x1.32ccccp-1f, -0x1.2b999ap-1f, -0x1.246668p-1f, -0x1.1d3334p-1f, \
    -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f, \
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f, \
    -0x1.b8ccccp-2f, -0x1.aa6666p-2f, -0x1.9cp-2f, -0x1.8d9998p-2f, \
    -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f, \
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f, \
    -0x1.0cp-2f, -0x1.fb3332p-3f, -0x1.de6666p-3f, -0x1.c1999ap-3f, \
    -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f, \
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f, \
    -0x1.93d70ap-4f, -0x1.8851eep-4f, -0x1.7ccccep-4f, -0x1.7147aep-4f, \
    -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f, \
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f, \
    -0x1.09999ap-4f, -0x1.fc28f6p-5f, -0x1.e51ebap-5f, -0x1.ce147ap-5f, \
    -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f, \
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f, \
    -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f, -0x1.a147aep-6f, -0x1.733334p-6f, \
    -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f, \
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, \
    -0x1.e978d4p-8f, -0x1.c49ba6p-8f, -0x1.9fbe76p-8f, -0x1.7ae148p-8f, \
    -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f, \
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, \
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f, -0x1.3dd982p-11f, \
    -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f, \
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, \
    -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f, 0x0.0p+0f, \
    0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f, \
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f, \
    0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f, \
    0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f, \
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f, \
    0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f, \
    0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f, \
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f, \
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f, \
    0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f, \
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f, \
    0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f, \
    0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f, \
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, \
    0x1.4eb854p-4f, 0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f, \
    0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f, \
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, \
    0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f, \
    0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f, \
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f, \
    0x1.626666p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f, \
    0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f, \
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f, \
    0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f, \
    0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f, \
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f, \
    0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f, \
    0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f, \
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, \
    0x1.b46666p-1f, 0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f, \
    0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f, \
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1.0p+0f
constexpr float kDynamicCode[256] = {PEFTX_DYNAMIC_CODE};
#if defined(__CUDACC__)
static __constant__ float kDynamicCodeDevice[256] = {PEFTX_DYNAMIC_CODE};
#endif

constexpr int64_t kNestedBlocksize = 256;

// Launch geometry of the CUDA kernels, shared with their CPU emulation: 1-D grids of
// kCudaThreads-thread blocks; the GEMV kernel maps one kWarp-lane warp to each output.
constexpr int kCudaThreads = 256;
constexpr int kWarp = 32;
// bitsandbytes clamps absmax to this before dividing (torch.clamp(min=1e-38) in fp32).
constexpr float kAbsmaxFloor = 1e-38f;

// Table lookups that read the __constant__ copy on the device and the constexpr copy on the host.
PEFTX_HD float code_at(int i) {
#if defined(__CUDA_ARCH__)
  return kCodeDevice[i];
#else
  return kCode[i];
#endif
}
PEFTX_HD float midpoint_at(int i) {
#if defined(__CUDA_ARCH__)
  return kMidpointsDevice[i];
#else
  return kMidpoints[i];
#endif
}

PEFTX_HD int64_t num_blocks(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

// Encode a scaled value in [-1, 1]: the number of boundaries strictly below it.
PEFTX_HD uint8_t encode(float scaled) {
  uint8_t q = 0;
PEFTX_UNROLL
  for (int i = 0; i < 15; ++i) q += scaled > midpoint_at(i) ? 1 : 0;
  return q;
}

PEFTX_HD float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// One quantization block: thread `block` of the quantize kernel (one thread per block), and the
// unit of work of the CPU kernel. Writes absmax[block] and the block's packed bytes. blocksize is
// even, so a block owns whole bytes. NaN propagates into absmax (the caller rejects non-finite
// blocks). Full blocks scale by x * (1 / max(absmax, 1e-38)), the tail block by x / max(absmax,
// 1e-38) and stores the clamped absmax: bitsandbytes' default backend does exactly this.
template <typename T>
PEFTX_HD void quantize_block(int64_t block, const T* __restrict__ w, int64_t n, int64_t blocksize,
                             uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  const int64_t begin = block * blocksize;
  const int64_t end = begin + blocksize < n ? begin + blocksize : n;
  const bool tail = end - begin < blocksize;
  float amax = 0.0f;
  for (int64_t j = begin; j < end; ++j) {
    const float a = to_float(w[j]);
    const float m = a < 0.0f ? -a : a;
    if (m > amax || m != m) amax = m;
    if (amax != amax) break;
  }
  const float floored = amax > kAbsmaxFloor ? amax : kAbsmaxFloor;
  const float inv = div_rn(1.0f, floored);
  absmax[block] = tail ? (amax != amax ? amax : floored) : amax;
  for (int64_t j = begin; j < end; j += 2) {
    const float a0 = to_float(w[j]);
    const float s0 = tail ? div_rn(a0, floored) : mul_rn(a0, inv);
    uint8_t byte = static_cast<uint8_t>(encode(clamp_unit(s0)) << 4);
    if (j + 1 < end) {
      const float a1 = to_float(w[j + 1]);
      const float s1 = tail ? div_rn(a1, floored) : mul_rn(a1, inv);
      byte |= encode(clamp_unit(s1));
    } else {
      // bitsandbytes pads an odd element count with one 0.0 before encoding.
      byte |= encode(0.0f);
    }
    packed[j >> 1] = byte;
  }
}

// Decode one element j of a 4-bit weight: code[nibble] * absmax[block], fp32.
PEFTX_HD float decode(int64_t j, const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                      const float* __restrict__ code, int64_t blocksize) {
  const uint8_t byte = packed[j >> 1];
  const uint8_t nib = (j & 1) ? (byte & 0x0f) : (byte >> 4);
  return mul_rn(code[nib], absmax[j / blocksize]);
}

// Thread `i` of the dequantize kernel (one thread per packed byte): elements 2i and 2i + 1.
template <typename T>
PEFTX_HD void dequantize_byte(int64_t i, const uint8_t* __restrict__ packed,
                              const float* __restrict__ absmax, const float* __restrict__ code,
                              int64_t blocksize, int64_t n, T* __restrict__ out) {
  const int64_t j = 2 * i;
  store(out + j, decode(j, packed, absmax, code, blocksize));
  if (j + 1 < n) store(out + j + 1, decode(j + 1, packed, absmax, code, blocksize));
}

// --- Double quantization: 8-bit blockwise quantization with a sorted 256-entry code book. ---

// bitsandbytes 0.50's CPU 8-bit blockwise quantizer (what quantize_4bit's double quantization
// runs on CPU), reproduced exactly: the scaled value t in [-1, 1] is first snapped to a 16-bit grid,
//   c = trunc(fma((t + 1) * 0.5, 65535, 0.5)),   v_c = (c + c) / 65535 - 1   (fp32 throughout),
// and the code index is the number of code midpoints (code[i] + code[i+1]) * 0.5 below v_c (its
// precomputed 65536-entry table). So the index is the nearest code to v_c, not always to t.
PEFTX_HD uint8_t encode8(float t, const float* __restrict__ code) {
#if defined(__CUDA_ARCH__)
  const float g = __fmaf_rn(mul_rn(add_rn(t, 1.0f), 0.5f), 65535.0f, 0.5f);
#else
  const float g = __builtin_fmaf(mul_rn(add_rn(t, 1.0f), 0.5f), 65535.0f, 0.5f);
#endif
  const int c = static_cast<int>(g) & 0xffff;
  const float fc = static_cast<float>(c);
  const float v = add_rn(div_rn(add_rn(fc, fc), 65535.0f), -1.0f);
  int lo = 0, hi = 255;  // count of midpoints < v lies in [lo, hi]
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (mul_rn(add_rn(code[mid], code[mid + 1]), 0.5f) < v) lo = mid + 1; else hi = mid;
  }
  return static_cast<uint8_t>(lo);
}

// Thread `block` of the 8-bit quantize kernel (one thread per nested block of x). An all-zero
// block stores absmax 0 and codes 0, as bitsandbytes does.
PEFTX_HD void quantize8_block(int64_t block, const float* __restrict__ x, int64_t n,
                              int64_t blocksize, const float* __restrict__ code,
                              uint8_t* __restrict__ q, float* __restrict__ absmax) {
  const int64_t begin = block * blocksize;
  const int64_t end = begin + blocksize < n ? begin + blocksize : n;
  float amax = 0.0f;
  for (int64_t j = begin; j < end; ++j) {
    const float m = x[j] < 0.0f ? -x[j] : x[j];
    if (m > amax) amax = m;
  }
  absmax[block] = amax;
  const float inv = amax > 0.0f ? div_rn(1.0f, amax) : 0.0f;
  for (int64_t j = begin; j < end; ++j)
    q[j] = amax > 0.0f ? encode8(clamp_unit(mul_rn(x[j], inv)), code) : 0;
}

// Element j of a double-quantized absmax vector (thread j of the absmax decode kernel).
PEFTX_HD float decode_absmax(int64_t j, const uint8_t* __restrict__ qabsmax,
                             const float* __restrict__ nested_absmax,
                             const float* __restrict__ nested_code, int64_t nested_blocksize,
                             float offset) {
  return add_rn(mul_rn(nested_code[qabsmax[j]], nested_absmax[j / nested_blocksize]), offset);
}

}  // namespace nf4
}  // namespace peftx

namespace peftx {
namespace nf4 {

// --- Matrix products against a 4-bit weight W [rows = out_features, cols = in_features]. ---

// The vectorized CUDA kernels read W 8 elements (4 packed bytes) at a time. They need an
// element index j0 that is a multiple of 8, which then starts a 4-byte-aligned group inside one
// absmax block (blocksize is a power of two >= 32): absmax[j0 >> bshift], bshift = log2(blocksize),
// with no 64-bit division.
PEFTX_HD int block_shift(int64_t blocksize) {
  int s = 0;
  while ((int64_t{1} << s) < blocksize) ++s;
  return s;
}

// The 4 packed bytes at p (4-byte aligned on the device: one 32-bit load), byte b in bits 8b .. 8b+7.
PEFTX_HD uint32_t load_packed4(const uint8_t* __restrict__ p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const unsigned int*>(p));
#else
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
         static_cast<uint32_t>(p[3]) << 24;
#endif
}

// Decodes the 8 elements of a packed word (element 2b in the high nibble of byte b, 2b + 1 in the
// low one), each code[nibble] * a as decode() rounds it.
PEFTX_HD void decode8(uint32_t w, float a, const float* __restrict__ code, float (&v)[8]) {
PEFTX_UNROLL
  for (int e = 0; e < 8; ++e) v[e] = mul_rn(code[(w >> (8 * (e >> 1) + ((e & 1) ? 0 : 4))) & 0xfu], a);
}

// Stores v[0 .. 8) at p as T (16-byte aligned on the device: one or two 16-byte stores).
template <typename T>
PEFTX_HD void store8(T* __restrict__ p, const float (&v)[8]) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    float4* q = reinterpret_cast<float4*>(p);
    q[0] = make_float4(v[0], v[1], v[2], v[3]);
    q[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
PEFTX_UNROLL
    for (int i = 0; i < 4; ++i) {
      T lo, hi;
      store(&lo, v[2 * i]);
      store(&hi, v[2 * i + 1]);
      w[i] = static_cast<uint32_t>(lo.bits) | static_cast<uint32_t>(hi.bits) << 16;
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
#else
  for (int e = 0; e < 8; ++e) store(p + e, v[e]);
#endif
}

// x[0 .. 8) as fp32 (16-byte aligned on the device: one 16-byte load, two for fp32).
template <typename T>
PEFTX_HD void load8(const T* __restrict__ p, float (&v)[8]) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
PEFTX_UNROLL
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = to_float(T{static_cast<uint16_t>(w[i] & 0xffffu)});
      v[2 * i + 1] = to_float(T{static_cast<uint16_t>(w[i] >> 16)});
    }
  }
#else
  for (int e = 0; e < 8; ++e) v[e] = to_float(p[e]);
#endif
}

// Thread i of the vectorized dequantize kernel: elements 8i .. 8i + 7 (those below n; a last
// partial group goes byte by byte).
template <typename T>
PEFTX_HD void dequantize_oct(int64_t i, const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                             const float* __restrict__ code, int64_t blocksize, int bshift, int64_t n,
                             T* __restrict__ out) {
  const int64_t j0 = 8 * i;
  if (j0 + 8 > n) {
    for (int64_t b = j0 / 2; 2 * b < n; ++b) dequantize_byte(b, packed, absmax, code, blocksize, n, out);
    return;
  }
  float v[8];
  decode8(load_packed4(packed + j0 / 2), absmax[j0 >> bshift], code, v);
  store8(out + j0, v);
}

// --- Matrix products against a 4-bit weight W [rows = out_features, cols = in_features]. ---

// Rows of x one warp of the GEMV kernel takes (its grid's y dimension walks the row groups).
constexpr int kGemvWarpRows = 4;

// GEMV, one warp per output column o and group of up to kGemvWarpRows rows of x (CUDA kernel
// nf4_gemv; needs cols % 8 == 0, x 16-byte aligned): lane `lane` returns in acc[r] its partial of
//   y[m0 + r, o] = sum_k x[m0 + r, k] * W[o, k]   (rows m0 + r < M; the others stay 0),
// over the 8-element groups c = lane, lane + kWarp, ... of W's row o: the warp reads 32 consecutive
// 4-byte words of the row per step, and decodes each weight once for all of its rows of x.
// The warp then sums each row's partials in warp_tree_sum's order (see below).
template <typename T>
PEFTX_HD void gemv_lane_partials(int64_t m0, int64_t M, int64_t o, int lane, const T* __restrict__ x,
                                 int64_t cols, const uint8_t* __restrict__ packed,
                                 const float* __restrict__ absmax, const float* __restrict__ code, int bshift,
                                 float (&acc)[kGemvWarpRows]) {
  const int64_t rows = M - m0 < kGemvWarpRows ? M - m0 : kGemvWarpRows;
PEFTX_UNROLL
  for (int r = 0; r < kGemvWarpRows; ++r) acc[r] = 0.0f;
  for (int64_t c = lane; 8 * c < cols; c += kWarp) {
    const int64_t j0 = o * cols + 8 * c;
    float w[8];
    decode8(load_packed4(packed + j0 / 2), absmax[j0 >> bshift], code, w);
PEFTX_UNROLL
    for (int r = 0; r < kGemvWarpRows; ++r) {
      if (r >= rows) break;
      float xv[8];
      load8(x + (m0 + r) * cols + 8 * c, xv);
PEFTX_UNROLL
      for (int e = 0; e < 8; ++e) acc[r] += xv[e] * w[e];
    }
  }
}

// The order in which a 32-lane warp combines partials with __shfl_down_sync at offsets 16, 8, 4,
// 2, 1 (lane i adds lane i + offset). The CPU emulation uses it to reproduce the device sum bit
// for bit. Invariant the kernel keeps: all 32 lanes are active and reach the shuffles.
PEFTX_HD float warp_tree_sum(float* v) {
  for (int offset = 16; offset > 0; offset >>= 1)
    for (int i = 0; i < offset; ++i) v[i] += v[i + offset];
  return v[0];
}

}  // namespace nf4
}  // namespace peftx
