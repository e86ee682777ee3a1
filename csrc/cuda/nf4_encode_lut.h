// Fast exact NF4 encoding for finite scaled values |x| <= 1 + 2^-20: every x = w * (1 / absmax)
// of a block whose absmax is finite (|x| <= 1 + 2^-23 for a normal scale; a subnormal scale, from
// absmax >= 2^126, keeps >= 21 bits, so |x| <= 1 + 2^-21). nf4_encode() costs 15 compares per element, which made quantize
// compute-bound; this costs one fma, one mask, one 8-byte table load and one compare.
//
// bin(x) = round-half-even(16x + 16) in [0, 32], computed with a single fma whose result lies in
// [2^26, 2^27), where the fp32 ulp is 8: fma(x, 128, 2^26 + 128) = 2^26 + 8 * bin(x) exactly, so
// bin(x) is the low mantissa bits. A bin spans 1/16 < the smallest gap between NF4 midpoints
// (0.080), so it holds at most one midpoint `thr`, and
//   code(x) = #{midpoints < x} = base[bin] + (x > thr[bin]).
// Equality with nf4_encode() for every such fp32 x is checked exhaustively by
// tests/cpp/nf4_encode_lut_check.cpp (host fmaf is correctly rounded, like the device's fma).
#pragma once

#include <cstdint>

#include "../nf4_format.h"

namespace moequant {

struct alignas(8) NF4Bin {
  float thr;      // the midpoint inside the bin, or +inf if none
  uint32_t base;  // number of midpoints below the bin
};

constexpr int kNF4Bins = 33;
constexpr float kNF4BinMagic = 67108864.0f + 128.0f;  // 2^26 + 128

struct NF4BinTable {
  NF4Bin bins[kNF4Bins];
};

// Bin b holds the reals x with round-half-even(16x + 16) == b: [(2b - 33) / 32, (2b - 31) / 32].
// No midpoint is a multiple of 1/32, so ties at bin edges never meet a midpoint.
constexpr NF4BinTable make_nf4_bin_table() {
  NF4BinTable t{};
  for (int b = 0; b < kNF4Bins; ++b) {
    const float lo = static_cast<float>(2 * b - 33) / 32.0f;
    const float hi = static_cast<float>(2 * b - 31) / 32.0f;
    uint32_t base = 0;
    float thr = __builtin_huge_valf();
    for (int i = 0; i < 15; ++i) {
      if (kNF4Midpoints[i] < lo) ++base;
      else if (kNF4Midpoints[i] < hi) thr = kNF4Midpoints[i];
    }
    t.bins[b] = NF4Bin{thr, base};
  }
  return t;
}

constexpr NF4BinTable kNF4BinTable = make_nf4_bin_table();

}  // namespace moequant
