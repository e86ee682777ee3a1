// Exhaustive proof that the CUDA quantize kernel's FP4 table encoding (csrc/cuda/nf4_encode_lut.h:
// bins from an fma rounded up, each entry holding its codes) equals fp4_encode() for every fp32 x
// with |x| <= 1 + 2^-20 (all ~2.1e9 of them), emulating the device's round-up fma with the host's
// fmaf under FE_UPWARD; the NF4 table is checked again alongside. Build and run (no GPU needed):
//   g++ -O2 -std=c++20 -fopenmp -I csrc tests/cpp/fp4_encode_lut_check.cpp -o /tmp/fp4lut && /tmp/fp4lut
#include <cfenv>
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
  const uint32_t top = to_bits(1.0f + std::ldexp(1.0f, -20));
  long long bad = 0, badfma = 0, badnf4 = 0;
#pragma omp parallel reduction(+ : bad, badfma, badnf4)
  {
    std::fesetround(FE_UPWARD);
    volatile float magic = kFP4BinMagic, k128 = 128.0f;
#pragma omp for schedule(static, 1 << 20)
    for (long long k = 0; k <= (long long)top; ++k) {
      for (uint32_t sign : {0u, 0x80000000u}) {
        const float x = from_bits(static_cast<uint32_t>(k) | sign);
        const int bin = fp4_bin(x);
        if (bin < 0 || bin >= kFP4Bins || fp4_encode_lut(x) != fp4_encode(x)) ++bad;
        const float f = std::fmaf(x, k128, magic);  // rounded up
        if (static_cast<int>(to_bits(f) & 63u) != bin || (to_bits(f) >> 6) != (to_bits(kFP4BinMagic) >> 6) ) ++badfma;
      }
    }
    std::fesetround(FE_TONEAREST);  // per thread: the pool's threads run the NF4 loop below
  }
#pragma omp parallel for reduction(+ : badnf4) schedule(static, 1 << 20)
  for (long long k = 0; k <= (long long)top; ++k)
    for (uint32_t sign : {0u, 0x80000000u}) {
      const float x = from_bits(static_cast<uint32_t>(k) | sign);
      if (nf4_encode_lut(x) != nf4_encode(x)) ++badnf4;
    }
  std::printf("fp4 mismatches %lld, fp4 fma-ru bin mismatches %lld, nf4 mismatches %lld (top %u)\n", bad, badfma, badnf4, top);
  return bad || badfma || badnf4;
}
