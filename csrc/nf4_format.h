// The NF4 data format shared by every kernel (CPU and CUDA): codebook, encode and decode.
// See DESIGN.md §2. Everything here must stay bit-identical to bitsandbytes' CPU/default
// `quantize_4bit(..., quant_type="nf4")`, so no fast-math and no reordering of fp32 arithmetic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOEQUANT_HD __host__ __device__ __forceinline__
#else
#define MOEQUANT_HD inline
#endif

namespace moequant {

// Smallest absmax used to form the reciprocal scale (bitsandbytes clamps with min=1e-38).
constexpr float kNF4MinAbsmax = 1e-38f;
// Code of 0.0: what an all-zero block stores (two per byte: 0x77).
constexpr uint8_t kNF4ZeroCode = 7;

// The 16 NF4 values (bitsandbytes' `get_4bit_type("nf4")`), as exact fp32 literals.
#define MOEQUANT_NF4_VALUES                                                            \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,           \
   -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,          \
   0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,                   \
   0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                    \
   0.7229568362236023f, 1.0f}

// fp32 midpoints (v[i] + v[i+1]) / 2 of neighbouring values, computed in fp32 exactly as
// bitsandbytes does; tests/test_nf4_format.py re-derives them.
#define MOEQUANT_NF4_MIDPOINTS                                                         \
  {-0.8480963706970215f, -0.6106328964233398f, -0.4599952697753906f,                   \
   -0.33967941999435425f, -0.23460739850997925f, -0.13791173696517944f,                \
   -0.045525018125772476f, 0.03979014977812767f, 0.120255246758461f,                   \
   0.2035212516784668f, 0.2920137643814087f, 0.3893125355243683f,                      \
   0.5016634464263916f, 0.6427869200706482f, 0.8614784479141235f}

constexpr float kNF4Values[16] = MOEQUANT_NF4_VALUES;
constexpr float kNF4Midpoints[15] = MOEQUANT_NF4_MIDPOINTS;

// Reciprocal scale of a block: 1 / max(absmax, 1e-38) in IEEE fp32. A NaN absmax stays NaN
// (torch.clamp propagates NaN; fmaxf would not), so the whole block encodes as code 15.
MOEQUANT_HD float nf4_block_scale(float absmax) {
  const float clamped = absmax < kNF4MinAbsmax ? kNF4MinAbsmax : absmax;
  return 1.0f / clamped;
}

// Running max of |x| that propagates NaN like torch.max.
MOEQUANT_HD float nf4_absmax_step(float running, float x) {
  const float a = x < 0.0f ? -x : x;
  return (a > running || a != a) ? a : running;
}

// Code of a scaled value: the number of midpoints t with !(x <= t). For real x this is the
// count of strict `x > t` (an exact tie goes to the lower code, like torch.bucketize); NaN
// gives 15, as bitsandbytes' bucketize does. Fifteen compares against immediates: no table
// lookup (a run-time index into an array would go to local memory on the GPU).
MOEQUANT_HD uint8_t nf4_encode(float x) {
  constexpr float mid[15] = MOEQUANT_NF4_MIDPOINTS;
  int code = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) code += !(x <= mid[i]);
  return static_cast<uint8_t>(code);
}

// Dequantized value in fp32; callers round it to the output dtype (nearest-even).
MOEQUANT_HD float nf4_decode(uint8_t code, float absmax, const float* values) {
  return values[code & 0xF] * absmax;
}

}  // namespace moequant
