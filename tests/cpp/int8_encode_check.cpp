// Exhaustive proof that the CUDA int8 row quantizer's code, the low byte of y + 1.5 * 2^23 (fp32
// round-to-nearest-even add), equals int8_encode(y, 1) for every fp32 |y| <= 128. Build and run:
//   g++ -O2 -std=c++20 -fopenmp -I csrc tests/cpp/int8_encode_check.cpp -o /tmp/int8enc && /tmp/int8enc
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cmath>
#include <initializer_list>
#include "quant_format.h"
using namespace moequant;
static float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static uint32_t to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
int main() {
  const uint32_t top = to_bits(128.0f);
  long long bad = 0;
  volatile float magic = 12582912.0f;
#pragma omp parallel for reduction(+ : bad) schedule(static, 1 << 20)
  for (long long k = 0; k <= (long long)top; ++k)
    for (uint32_t sign : {0u, 0x80000000u}) {
      const float y = from_bits(static_cast<uint32_t>(k) | sign);
      const uint8_t fast = static_cast<uint8_t>(to_bits(y + magic) & 0xFF);
      const uint8_t ref = static_cast<uint8_t>(int8_encode(y, 1.0f));
      if (fast != ref) ++bad;
    }
  std::printf("int8 magic-add mismatches for |y| <= 128: %lld\n", bad);
  return bad != 0;
}
