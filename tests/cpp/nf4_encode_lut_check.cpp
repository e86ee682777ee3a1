// Exhaustive proof that the CUDA quantize kernel's table encoding (csrc/cuda/nf4_encode_lut.h)
// equals nf4_encode() for every fp32 x with |x| <= 1 + 2^-20 (all ~2.1e9 of them), emulating the
// device's fma with the correctly rounded host fmaf. Build and run (no GPU needed):
//   g++ -O2 -std=c++20 -fopenmp -I csrc tests/cpp/nf4_encode_lut_check.cpp -o /tmp/lut && /tmp/lut
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>

#include "cuda/nf4_encode_lut.h"

using namespace moequant;

static float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static uint32_t to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

int main() {
  for (int i = 0; i < 15; ++i) {
    const float s = kNF4Midpoints[i] * 32.0f;
    if (s == std::floor(s)) { std::printf("FAIL: midpoint %d is a multiple of 1/32\n", i); return 1; }
  }
  const uint32_t top = to_bits(1.0f + std::ldexp(1.0f, -20));
  long long mismatches = 0;
#pragma omp parallel for reduction(+ : mismatches) schedule(static, 1 << 20)
  for (long long k = 0; k <= (long long)top; ++k) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      const float x = from_bits(static_cast<uint32_t>(k) | sign);
      const int bin = static_cast<int>(to_bits(std::fmaf(x, 128.0f, kNF4BinMagic)) & 63u);
      const NF4Bin e = kNF4BinTable.bins[bin < kNF4Bins ? bin : 0];
      const uint32_t fast = e.base + (x > e.thr ? 1u : 0u);
      if (bin >= kNF4Bins || fast != nf4_encode(x)) ++mismatches;
    }
  }
  std::printf("checked |x| <= 1+2^-20 (%u magnitudes x 2 signs): %lld mismatches\n", top + 1, mismatches);
  return mismatches == 0 ? 0 : 1;
}
