// The two 8-bit dynamic maps of bitsandbytes' 8-bit Adam and the nearest-code encoder shared by the
// CPU kernels, the CUDA kernels and the CPU emulation of the CUDA grid.
//
//   signed map   (first moment m):  bitsandbytes functional.create_dynamic_map(signed=True), the
//                                   table nf4::kDynamicCode (it is also the double-quant code book);
//   unsigned map (second moment v): create_dynamic_map(signed=False), kUnsignedDynamicCode below.
//
// Both are sorted ascending with 256 entries in [-1, 1]. A scaled value x in [-1, 1] is encoded as the
// number of code midpoints (code[i] + code[i + 1]) * 0.5 (fp32) strictly below x: the nearest code,
// ties to the lower one. That is torch.bucketize(x, midpoints), what bitsandbytes' pure-torch
// quantize_blockwise does. Instead of an 8-step binary search the encoder makes one lookup in a
// bucket table indexed by x's sign, exponent and top 7 mantissa bits. Every bucket holds at most
// one midpoint (QuantTables::build checks it), whose sign, exponent and top 7 mantissa bits are the
// bucket's, so an entry packs the count below the bucket, whether a midpoint is inside, and that
// midpoint's low 16 mantissa bits: x is above it iff x's low 16 bits compare above (below for
// negative x).
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "nf4/nf4_math.h"

namespace peftx {
namespace optim {

#define PEFTX_UNSIGNED_DYNAMIC_CODE \
    0x0.0p+0f, 0x1.5cf754p-22f, 0x1.a0133p-21f, 0x1.1d367p-19f, \
    0x1.2599ecp-18f, 0x1.bc98a2p-18f, 0x1.29cbaap-17f, 0x1.0624dcp-16f, \
    0x1.c2e34p-16f, 0x1.3fd0dp-15f, 0x1.9e3p-15f, 0x1.fc8f34p-15f, \
    0x1.2d7732p-14f, 0x1.5ca6c8p-14f, 0x1.8bd662p-14f, 0x1.0cb296p-13f, \
    0x1.82a994p-13f, 0x1.f8a092p-13f, 0x1.374bc8p-12f, 0x1.724744p-12f, \
    0x1.ad42c6p-12f, 0x1.e83e44p-12f, 0x1.119ce2p-11f, 0x1.2f1aap-11f, \
    0x1.4c986p-11f, 0x1.6a162p-11f, 0x1.8793dep-11f, 0x1.a511ap-11f, \
    0x1.c28f5ep-11f, 0x1.e00d1cp-11f, 0x1.fd8adcp-11f, 0x1.2b020cp-10f, \
    0x1.74bc6ap-10f, 0x1.be76c8p-10f, 0x1.041894p-9f, 0x1.28f5c2p-9f, \
    0x1.4dd2fp-9f, 0x1.72b02p-9f, 0x1.978d4ep-9f, 0x1.bc6a8p-9f, \
    0x1.e147aep-9f, 0x1.03126ep-8f, 0x1.158104p-8f, 0x1.27ef9ep-8f, \
    0x1.3a5e34p-8f, 0x1.4cccccp-8f, 0x1.5f3b64p-8f, 0x1.71a9fap-8f, \
    0x1.841894p-8f, 0x1.96872ap-8f, 0x1.a8f5c2p-8f, 0x1.bb645cp-8f, \
    0x1.cdd2fp-8f, 0x1.e0418ap-8f, 0x1.f2b01ep-8f, 0x1.028f5cp-7f, \
    0x1.0bc6a8p-7f, 0x1.14fdf2p-7f, 0x1.1e354p-7f, 0x1.276c8ap-7f, \
    0x1.30a3d6p-7f, 0x1.39db24p-7f, 0x1.43126ep-7f, 0x1.5eb854p-7f, \
    0x1.8ccccep-7f, 0x1.bae146p-7f, 0x1.e8f5c4p-7f, 0x1.0b851ep-6f, \
    0x1.228f5ep-6f, 0x1.39999ap-6f, 0x1.50a3d6p-6f, 0x1.67ae16p-6f, \
    0x1.7eb852p-6f, 0x1.95c28ep-6f, 0x1.accccep-6f, 0x1.c3d70ep-6f, \
    0x1.dae146p-6f, 0x1.f1eb86p-6f, 0x1.047aep-5f, 0x1.1p-5f, \
    0x1.1b851ep-5f, 0x1.270a3ep-5f, 0x1.328f5ep-5f, 0x1.3e147ap-5f, \
    0x1.49999ap-5f, 0x1.551eb8p-5f, 0x1.60a3d6p-5f, 0x1.6c28f6p-5f, \
    0x1.77ae14p-5f, 0x1.833334p-5f, 0x1.8eb85p-5f, 0x1.9a3d7p-5f, \
    0x1.a5c28ep-5f, 0x1.b147aep-5f, 0x1.bccccep-5f, 0x1.c851eep-5f, \
    0x1.d3d70ep-5f, 0x1.df5c2ap-5f, 0x1.eae146p-5f, 0x1.f66666p-5f, \
    0x1.00f5c4p-4f, 0x1.06b854p-4f, 0x1.0c7ae2p-4f, 0x1.123d7p-4f, \
    0x1.18p-4f, 0x1.1dc29p-4f, 0x1.23852p-4f, 0x1.2947aep-4f, \
    0x1.2f0a3ep-4f, 0x1.34cccep-4f, 0x1.3a8f5ep-4f, 0x1.4051ecp-4f, \
    0x1.46147cp-4f, 0x1.4bd70ap-4f, 0x1.51999ap-4f, 0x1.575c2ap-4f, \
    0x1.5d1eb8p-4f, 0x1.62e148p-4f, 0x1.68a3d6p-4f, 0x1.6e6666p-4f, \
    0x1.7428f6p-4f, 0x1.79eb86p-4f, 0x1.7fae16p-4f, 0x1.8570a4p-4f, \
    0x1.8b3334p-4f, 0x1.90f5c4p-4f, 0x1.96b852p-4f, 0x1.a8p-4f, \
    0x1.c4ccccp-4f, 0x1.e1999ap-4f, 0x1.fe6666p-4f, 0x1.0d9998p-3f, \
    0x1.1cp-3f, 0x1.2a6668p-3f, 0x1.38ccccp-3f, 0x1.473334p-3f, \
    0x1.559998p-3f, 0x1.64p-3f, 0x1.726668p-3f, 0x1.80ccccp-3f, \
    0x1.8f3334p-3f, 0x1.9d9998p-3f, 0x1.acp-3f, 0x1.ba6668p-3f, \
    0x1.c8ccccp-3f, 0x1.d73334p-3f, 0x1.e59998p-3f, 0x1.f4p-3f, \
    0x1.013332p-2f, 0x1.086666p-2f, 0x1.0f999ap-2f, 0x1.16ccccp-2f, \
    0x1.1ep-2f, 0x1.253334p-2f, 0x1.2c6666p-2f, 0x1.339998p-2f, \
    0x1.3accccp-2f, 0x1.42p-2f, 0x1.493334p-2f, 0x1.506666p-2f, \
    0x1.579998p-2f, 0x1.5eccccp-2f, 0x1.66p-2f, 0x1.6d3334p-2f, \
    0x1.746666p-2f, 0x1.7b9998p-2f, 0x1.82ccccp-2f, 0x1.8ap-2f, \
    0x1.913334p-2f, 0x1.986666p-2f, 0x1.9f9998p-2f, 0x1.a6ccccp-2f, \
    0x1.aep-2f, 0x1.b53334p-2f, 0x1.bc6666p-2f, 0x1.c39998p-2f, \
    0x1.caccccp-2f, 0x1.d2p-2f, 0x1.d93334p-2f, 0x1.e06666p-2f, \
    0x1.e79998p-2f, 0x1.eeccccp-2f, 0x1.f6p-2f, 0x1.fd3332p-2f, \
    0x1.023334p-1f, 0x1.05ccccp-1f, 0x1.096666p-1f, 0x1.0dp-1f, \
    0x1.109998p-1f, 0x1.143334p-1f, 0x1.17ccccp-1f, 0x1.1b6668p-1f, \
    0x1.1fp-1f, 0x1.22999ap-1f, 0x1.263334p-1f, 0x1.29ccccp-1f, \
    0x1.2d6668p-1f, 0x1.31p-1f, 0x1.34999ap-1f, 0x1.383334p-1f, \
    0x1.3bccccp-1f, 0x1.3f6668p-1f, 0x1.43p-1f, 0x1.46999ap-1f, \
    0x1.4a3334p-1f, 0x1.4dccccp-1f, 0x1.516668p-1f, 0x1.55p-1f, \
    0x1.58999ap-1f, 0x1.5c3334p-1f, 0x1.5fccccp-1f, 0x1.636668p-1f, \
    0x1.67p-1f, 0x1.6a999ap-1f, 0x1.6e3334p-1f, 0x1.71ccccp-1f, \
    0x1.756668p-1f, 0x1.79p-1f, 0x1.7c999ap-1f, 0x1.803334p-1f, \
    0x1.83ccccp-1f, 0x1.876668p-1f, 0x1.8bp-1f, 0x1.8e9998p-1f, \
    0x1.923334p-1f, 0x1.95ccccp-1f, 0x1.996668p-1f, 0x1.9dp-1f, \
    0x1.a09998p-1f, 0x1.a43334p-1f, 0x1.a7ccccp-1f, 0x1.ab6668p-1f, \
    0x1.afp-1f, 0x1.b29998p-1f, 0x1.b63334p-1f, 0x1.b9ccccp-1f, \
    0x1.bd6668p-1f, 0x1.c1p-1f, 0x1.c49998p-1f, 0x1.c83334p-1f, \
    0x1.cbccccp-1f, 0x1.cf6668p-1f, 0x1.d3p-1f, 0x1.d69998p-1f, \
    0x1.da3334p-1f, 0x1.ddccccp-1f, 0x1.e16668p-1f, 0x1.e5p-1f, \
    0x1.e89998p-1f, 0x1.ec3334p-1f, 0x1.efccccp-1f, 0x1.f36668p-1f, \
    0x1.f7p-1f, 0x1.fa9998p-1f, 0x1.fe3334p-1f, 0x1.0p+0f

constexpr float kUnsignedDynamicCode[256] = {PEFTX_UNSIGNED_DYNAMIC_CODE};

// Bucket geometry: |x| >= 2^(kMinExponent - 127) is bucketed by exponent (kMinExponent..127, bucket
// 1..24) and its top kMantissaBits mantissa bits; smaller magnitudes share bucket 0. The smallest
// nonzero midpoint of either map is 1.6e-7 > 2^-23, so bucket 0 holds no midpoint.
constexpr int kMinExponent = 104;
constexpr int kExponentBuckets = 128 - kMinExponent + 1;  // 25, bucket 0 included
constexpr int kMantissaBits = 7;
constexpr int kBucketsPerSign = kExponentBuckets << kMantissaBits;  // 3200
constexpr int kBuckets = 2 * kBucketsPerSign;                         // 6400

// Everything the 8-bit kernels look up, as one plain struct: built once on the host, copied as bytes
// to each device that runs the CUDA kernels. Index 0 is the signed map (m), 1 the unsigned map (v).
struct QuantTables {
  float code[2][256];
  // bits 0-7: midpoints below every value of the bucket; bit 8: a midpoint lies inside; bits 16-31:
  // that midpoint's low 16 mantissa bits. Midpoints are (code[i] + code[i + 1]) * 0.5f in fp32.
  uint32_t entry[2][kBuckets];

  // Fills the tables; returns false if some bucket would hold more than one midpoint.
  bool build();
};

PEFTX_HD int bucket_of(float x) {
  const uint32_t u = float_bits(x);
  const int e = static_cast<int>((u >> 23) & 0xffu);
  const int sign = static_cast<int>(u >> 31);
  int b = 0;
  if (e >= kMinExponent) {
    // e > 127 (|x| > 1, inf, NaN) cannot come from a clamped scaled value except NaN; it shares the
    // top bucket so the lookup stays in range.
    const int eb = e > 127 ? kExponentBuckets - 1 : e - kMinExponent + 1;
    b = (eb << kMantissaBits) | static_cast<int>((u >> (23 - kMantissaBits)) & ((1u << kMantissaBits) - 1u));
  }
  return sign * kBucketsPerSign + b;
}

// Nearest code of x (map 0 signed, 1 unsigned): the number of midpoints strictly below x. NaN
// encodes as the base of its bucket.
PEFTX_HD uint8_t encode_nearest(const QuantTables& t, int map, float x) {
  const uint32_t u = float_bits(x);
  const uint32_t e = t.entry[map][bucket_of(x)];
  const uint32_t low = u & 0xffffu, mid_low = e >> 16;
  const bool above = (e & 0x100u) != 0 && ((u >> 31) != 0 ? low < mid_low : low > mid_low);
  return static_cast<uint8_t>((e & 0xffu) + (above ? 1u : 0u));
}

// Host only: the tables' contents, and the reference encoder used to check the bucket tables.
#if !defined(__CUDA_ARCH__)
inline bool QuantTables::build() {
  for (int i = 0; i < 256; ++i) {
    code[0][i] = nf4::kDynamicCode[i];
    code[1][i] = kUnsignedDynamicCode[i];
  }
  for (int k = 0; k < 2; ++k) {
    float mid[255];
    for (int i = 0; i < 255; ++i) mid[i] = (code[k][i] + code[k][i + 1]) * 0.5f;
    for (int sign = 0; sign < 2; ++sign) {
      for (int b = 0; b < kBucketsPerSign; ++b) {
        // Bucket b covers magnitudes [lo, hi): exact powers of two times (1 + j / 128).
        const int eb = b >> kMantissaBits, j = b & ((1 << kMantissaBits) - 1);
        float lo = 0.0f, hi = 0.0f;
        if (eb == 0) {
          hi = __builtin_ldexpf(1.0f, kMinExponent - 127);
        } else {
          const int e = eb + kMinExponent - 1 - 127;
          lo = __builtin_ldexpf(1.0f + j / 128.0f, e);
          hi = __builtin_ldexpf(1.0f + (j + 1) / 128.0f, e);
        }
        // Positive bucket: values in [lo, hi), below = #(mid < lo). Negative: (-hi, -lo], below =
        // #(mid <= -hi).
        int below = 0, inside = 0;
        float in = 0.0f;
        for (int i = 0; i < 255; ++i) {
          const float m = mid[i];
          const bool under = sign == 0 ? m < lo : m <= -hi;
          const bool within = sign == 0 ? (m >= lo && m < hi) : (m > -hi && m <= -lo);
          below += under;
          if (within) {
            ++inside;
            in = m;
          }
        }
        // At most one midpoint per bucket, and bucket 0 (mixed exponents) must hold none.
        if (inside > 1 || (inside == 1 && eb == 0)) return false;
        entry[k][sign * kBucketsPerSign + b] =
            static_cast<uint32_t>(below) | (inside ? 0x100u | ((float_bits(in) & 0xffffu) << 16) : 0u);
      }
    }
  }
  return true;
}
#endif

}  // namespace optim
}  // namespace peftx
