// Portable building blocks for code shared by the CPU kernels, the CUDA kernels and the CPU
// emulation of the CUDA grid. Nothing here includes torch: .cu files include this header.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PEFTX_HD __host__ __device__ __forceinline__
#else
#define PEFTX_HD inline
#endif
// Loop unrolling hint for the device pass only (the host compiler rejects the pragma).
#if defined(__CUDA_ARCH__)
#define PEFTX_UNROLL _Pragma("unroll")
#else
#define PEFTX_UNROLL
#endif

namespace peftx {

// Storage types for 16-bit floats, layout-identical to at::Half / at::BFloat16 / __half /
// __nv_bfloat16 (one uint16_t), so a tensor's data pointer can be reinterpreted as these.
struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

PEFTX_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  union {
    float f;
    uint32_t u;
  } c{v};
  return c.u;
#endif
}

PEFTX_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  union {
    uint32_t u;
    float f;
  } c{u};
  return c.f;
#endif
}

// Multiplication and addition that are never contracted into an FMA: formats such as the
// bitsandbytes absmax decode are defined by two separately rounded operations. Host code is
// compiled with -ffp-contract=off; device code uses the explicitly rounded intrinsics.
PEFTX_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PEFTX_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
PEFTX_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

PEFTX_HD float to_float(float v) { return v; }

PEFTX_HD float to_float(bf16_t v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN included).
PEFTX_HD float to_float(f16_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu;
  uint32_t man = v.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // Subnormal: normalise the mantissa.
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    man &= 0x3ffu;
    return bits_float(sign | ((112u - e) << 23) | (man << 13));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

// binary32 -> bfloat16, round to nearest even; NaN stays NaN (quiet).
PEFTX_HD bf16_t bf16_from_float(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>((u + rounding) >> 16)};
}

// binary32 -> binary16, round to nearest even, overflow to inf, subnormals exact.
PEFTX_HD f16_t f16_from_float(float f) {
#if defined(__CUDA_ARCH__)
  return f16_t{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (au >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (au < 0x38800000u) {
    // Result is subnormal (or zero) in binary16: shift the full mantissa, round to nearest even.
    if (au < 0x33000000u) return f16_t{sign};  // below half of the smallest subnormal
    const uint32_t exp = au >> 23;
    const uint32_t man = (au & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // in [14, 24]
    uint32_t half_man = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
    return f16_t{static_cast<uint16_t>(sign | half_man)};
  }
  uint32_t r = au - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = r & 0x1fffu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return f16_t{static_cast<uint16_t>(sign | r)};
#endif
}

PEFTX_HD void store(float* p, float v) { *p = v; }
PEFTX_HD void store(bf16_t* p, float v) { *p = bf16_from_float(v); }
PEFTX_HD void store(f16_t* p, float v) { *p = f16_from_float(v); }

}  // namespace peftx
