// Fast exact 4-bit encoding (NF4 and FP4) for finite scaled values |x| <= 1 + 2^-20: every
// x = w * (1 / absmax) of a block whose absmax is finite (|x| <= 1 + 2^-23 for a normal scale; a
// subnormal scale, from absmax >= 2^126, keeps >= 21 bits, so |x| <= 1 + 2^-21). The 15-compare
// encoders of quant_format.h make quantize compute-bound; this costs one fma, one shift, one
// 8-byte table load, one compare and one predicated add (FP4: predicated shift).
//
// The code of x is its rank r(x) = #{midpoints < x} among the sorted codebook values (FP4: then
// the code of that rank). bin(x) = round-half-even(16x + 16) in [0, 32] comes from a single fma
// whose result lies in [2^26, 2^27), where the fp32 ulp is 8: fma(x, 128, 2^26 + 128) =
// 2^26 + 8 * bin(x) exactly, so bin(x) is the low mantissa bits. A bin spans 1/16. NF4's
// midpoints are at least 0.080 apart, so a bin holds at most one of them (`thr`) and
//   r(x) = base[bin] + (x > thr[bin]).
// Equality with the compare encoders for every such fp32 x is checked exhaustively by
// tests/cpp/nf4_encode_lut_check.cpp (NF4; host fmaf is correctly rounded, like the device's fma);
// FP4's table below was checked the same way through fp4_encode_lut (0 mismatches in 2.1e9).
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

// FP4 has three midpoints within 1/32 of zero (-0.0026, 0, +0.0026), too close for NF4's bins.
// Its bins come from the same fma rounded up instead: fma_ru(x, 128, 2^26 + 128) = 2^26 + 8 * bin(x)
// with bin(x) = ceil(16x + 16) in [0, 33] (for x in [-1 - 2^-20, -1) the exact sum lies just below
// 2^26 and rounds up to it: bin 0), so bin b holds the reals in ((b - 17) / 16, (b - 16) / 16].
// Zero is the top of bin 16, where no x of the bin exceeds it, and +-0.0026 fall in bins 16 and 17:
// again at most one midpoint a value of the bin can exceed. The entry holds the codes directly, of
// the ranks base and base + 1 in its low two nibbles, so the encoder takes one of them (a
// predicated shift) where NF4 adds 1 to its rank.
struct alignas(8) Quant4CodeBin {
  float thr;       // the midpoint inside the bin that some of its values exceed, or +inf if none
  uint32_t codes;  // code of rank base in bits [0, 4), of rank base + 1 in bits [4, 8)
};

constexpr int kFP4Bins = 34;
constexpr float kFP4BinMagic = kNF4BinMagic;  // with round-up instead of round-to-nearest

struct Quant4CodeBinTable {
  Quant4CodeBin bins[kFP4Bins];
};

constexpr uint32_t fp4_code_of_rank(uint32_t rank) {
  return rank < 16 ? static_cast<uint32_t>(kFP4CodeOfRank >> (4 * rank)) & 0xFu : 0u;
}

// Midpoints a value of bin b can exceed: (b - 17) / 16 < m < (b - 16) / 16.
constexpr int fp4_midpoints_inside(int b) {
  const float lo = static_cast<float>(b - 17) / 16.0f, hi = static_cast<float>(b - 16) / 16.0f;
  int inside = 0;
  for (float m : kFP4Midpoints) inside += lo < m && m < hi;
  return inside;
}

constexpr Quant4CodeBinTable make_fp4_code_bin_table() {
  Quant4CodeBinTable t{};
  for (int b = 0; b < kFP4Bins; ++b) {
    const float lo = static_cast<float>(b - 17) / 16.0f, hi = static_cast<float>(b - 16) / 16.0f;
    uint32_t base = 0;  // midpoints every value of the bin exceeds
    float thr = __builtin_huge_valf();
    for (float m : kFP4Midpoints) {
      if (m <= lo) ++base;
      else if (m < hi) thr = m;
    }
    t.bins[b] = Quant4CodeBin{thr, fp4_code_of_rank(base) | fp4_code_of_rank(base + 1) << 4};
  }
  return t;
}
constexpr Quant4CodeBinTable kFP4CodeBinTable = make_fp4_code_bin_table();
constexpr bool fp4_bins_hold_one_midpoint() {
  for (int b = 0; b < kFP4Bins; ++b) {
    if (fp4_midpoints_inside(b) > 1) return false;
  }
  return true;
}
static_assert(fp4_bins_hold_one_midpoint());

// Host references of the fast encoders (what the CUDA kernel computes), for exhaustive checks.
// bin(x) is computed exactly in double (16x is exact, ceil of an exact double is exact).
inline uint8_t nf4_encode_lut(float x) {
  const float f = __builtin_fmaf(x, 128.0f, kNF4BinMagic);
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  const NF4Bin e = kNF4BinTable.bins[bits & 63u];
  return static_cast<uint8_t>(e.base + (x > e.thr ? 1u : 0u));
}
inline int fp4_bin(float x) { return 16 + static_cast<int>(__builtin_ceil(16.0 * static_cast<double>(x))); }
inline uint8_t fp4_encode_lut(float x) {
  const Quant4CodeBin e = kFP4CodeBinTable.bins[fp4_bin(x)];
  return static_cast<uint8_t>((x > e.thr ? e.codes >> 4 : e.codes) & 0xFu);
}

}  // namespace moequant
