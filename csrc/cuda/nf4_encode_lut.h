// Fast exact 4-bit encoding (NF4 and FP4) for finite scaled values |x| <= 1 + 2^-20: every
// x = w * (1 / absmax) of a block whose absmax is finite (|x| <= 1 + 2^-23 for a normal scale; a
// subnormal scale, from absmax >= 2^126, keeps >= 21 bits, so |x| <= 1 + 2^-21). The 15-compare
// encoders of quant_format.h make quantize compute-bound; this costs one fma, one mask, one
// 8-byte table load and one compare (FP4: two more compares and a nibble shift).
//
// The code of x is its rank r(x) = #{midpoints < x} among the sorted codebook values (FP4: then
// the code of that rank). bin(x) = round-half-even(16x + 16) in [0, 32] comes from a single fma
// whose result lies in [2^26, 2^27), where the fp32 ulp is 8: fma(x, 128, 2^26 + 128) =
// 2^26 + 8 * bin(x) exactly, so bin(x) is the low mantissa bits. A bin spans 1/16. NF4's
// midpoints are at least 0.080 apart, so a bin holds at most one of them (`thr`) and
//   r(x) = base[bin] + (x > thr[bin]).
// FP4 has three midpoints within 1/32 of zero (-0.0026, 0, +0.0026): the outer two are counted
// with two compares of their own ("extras") and left out of the table, and every bin again
// holds at most one of the rest.
// Equality with the compare encoders for every such fp32 x is checked exhaustively by
// tests/cpp/nf4_encode_lut_check.cpp (NF4; host fmaf is correctly rounded, like the device's fma).
#pragma once

#include <cstdint>

#include "../quant_format.h"

namespace moequant {

struct alignas(8) NF4Bin {
  float thr;      // the midpoint inside the bin, or +inf if none
  uint32_t base;  // number of table midpoints below the bin
};

constexpr int kNF4Bins = 33;
constexpr float kNF4BinMagic = 67108864.0f + 128.0f;  // 2^26 + 128

struct NF4BinTable {
  NF4Bin bins[kNF4Bins];
};

// Bin b holds the reals x with round-half-even(16x + 16) == b: [(2b - 33) / 32, (2b - 31) / 32].
// No midpoint is a multiple of 1/32, so ties at bin edges never meet a midpoint. Midpoints i
// with skip(i) are left out (counted by the caller's own compares).
template <typename Skip>
constexpr NF4BinTable make_bin_table(const float (&mid)[15], Skip skip) {
  NF4BinTable t{};
  for (int b = 0; b < kNF4Bins; ++b) {
    const float lo = static_cast<float>(2 * b - 33) / 32.0f;
    const float hi = static_cast<float>(2 * b - 31) / 32.0f;
    uint32_t base = 0;
    float thr = __builtin_huge_valf();
    for (int i = 0; i < 15; ++i) {
      if (skip(i)) continue;
      if (mid[i] < lo) ++base;
      else if (mid[i] < hi) thr = mid[i];
    }
    t.bins[b] = NF4Bin{thr, base};
  }
  return t;
}

// Whether every bin holds at most one table midpoint (what the one compare per value needs).
template <typename Skip>
constexpr bool bins_hold_one_midpoint(const float (&mid)[15], Skip skip) {
  for (int b = 0; b < kNF4Bins; ++b) {
    const float lo = static_cast<float>(2 * b - 33) / 32.0f;
    const float hi = static_cast<float>(2 * b - 31) / 32.0f;
    int inside = 0;
    for (int i = 0; i < 15; ++i) inside += !skip(i) && mid[i] >= lo && mid[i] < hi;
    if (inside > 1) return false;
  }
  return true;
}

constexpr NF4BinTable make_nf4_bin_table() {
  return make_bin_table(kNF4Midpoints, [](int) { return false; });
}
constexpr NF4BinTable kNF4BinTable = make_nf4_bin_table();
static_assert(bins_hold_one_midpoint(kNF4Midpoints, [](int) { return false; }));

// FP4: midpoints 6 and 8 (-0.0026 and +0.0026) are the extras.
constexpr int kFP4ExtraLow = 6, kFP4ExtraHigh = 8;
constexpr bool fp4_is_extra(int i) { return i == kFP4ExtraLow || i == kFP4ExtraHigh; }
constexpr NF4BinTable kFP4BinTable = make_bin_table(kFP4Midpoints, [](int i) { return fp4_is_extra(i); });
static_assert(bins_hold_one_midpoint(kFP4Midpoints, [](int i) { return fp4_is_extra(i); }));

// What the fast encoder of a 4-bit format needs besides its bin table: the extra midpoints
// counted by compares (+inf when unused) and the code of each rank (16 nibbles, rank r in bits
// [4r, 4r + 4)).
struct Quant4EncodeExtras {
  float extra_low, extra_high;
  uint64_t code_of_rank;
};
constexpr uint64_t kIdentityCodeOfRank = 0xFEDCBA9876543210ull;
constexpr Quant4EncodeExtras kNF4EncodeExtras{__builtin_huge_valf(), __builtin_huge_valf(), kIdentityCodeOfRank};
constexpr Quant4EncodeExtras kFP4EncodeExtras{kFP4Midpoints[kFP4ExtraLow], kFP4Midpoints[kFP4ExtraHigh],
                                              kFP4CodeOfRank};

// Host reference of the fast encoder (what the CUDA kernel computes), for exhaustive checks.
inline uint8_t quant4_encode_lut(const NF4BinTable& table, const Quant4EncodeExtras& extras, float x) {
  const float f = __builtin_fmaf(x, 128.0f, kNF4BinMagic);
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  const NF4Bin e = table.bins[bits & 63u];
  const uint32_t rank = e.base + (x > e.thr) + (x > extras.extra_low) + (x > extras.extra_high);
  return static_cast<uint8_t>((extras.code_of_rank >> (4 * rank)) & 0xF);
}

}  // namespace moequant
