// The storage formats shared by every kernel (CPU and CUDA): 4-bit codebooks (NF4, FP4), int8
// row-wise, and double-quantized block statistics. See the README (Formats) and DESIGN.md §2.
// Everything here must stay bit-identical to bitsandbytes 0.50.2's CPU/default backend, so no
// fast-math and no reordering or contraction of fp32 arithmetic.
#pragma once

#include <cstdint>

#include "nf4_format.h"

namespace moequant {

enum class QuantType { kNF4, kFP4, kInt8 };

MOEQUANT_HD bool is_4bit(QuantType t) { return t != QuantType::kInt8; }

// ---- FP4 --------------------------------------------------------------------------------
// bitsandbytes' `get_4bit_type("fp4")`, indexed by code (not sorted; codes 0 and 8 are both +0,
// code 8 being the sign bit's twin of code 0).
#define MOEQUANT_FP4_VALUES                                                                   \
  {0.0f, 0.005208333488553762f, 0.6666666865348816f, 1.0f, 0.3333333432674408f, 0.5f,          \
   0.1666666716337204f, 0.25f, 0.0f, -0.005208333488553762f, -0.6666666865348816f, -1.0f,     \
   -0.3333333432674408f, -0.5f, -0.1666666716337204f, -0.25f}

// fp32 midpoints of the sorted FP4 values (bitsandbytes' `_get_4bit_quantize_bounds("fp4")`).
#define MOEQUANT_FP4_MIDPOINTS                                                                \
  {-0.8333333730697632f, -0.5833333730697632f, -0.4166666865348816f, -0.2916666865348816f,     \
   -0.2083333432674408f, -0.0859375f, -0.0026041667442768812f, 0.0f, 0.0026041667442768812f,   \
   0.0859375f, 0.2083333432674408f, 0.2916666865348816f, 0.4166666865348816f,                  \
   0.5833333730697632f, 0.8333333730697632f}

// Code of the r-th smallest FP4 value (bitsandbytes' argsort order of the codebook), packed as
// 16 nibbles, rank r in bits [4r, 4r+4): a shift instead of a run-time array index on the GPU.
// Ranks 7 and 8 are the two zeros: code 0 ranks first, so [-0.0026, 0] -> code 0 and
// (0, 0.0026] -> code 8, exactly as bitsandbytes' bucketize + order lookup stores them.
constexpr uint64_t kFP4CodeOfRank = 0x3254761809EFCDABull;  // ranks 0..15: 11,10,13,12,15,14,9,0,8,1,6,7,4,5,2,3

constexpr float kFP4Values[16] = MOEQUANT_FP4_VALUES;
constexpr float kFP4Midpoints[15] = MOEQUANT_FP4_MIDPOINTS;

// FP4 code of a scaled value: rank among the sorted values (ties to the lower one, NaN -> 15,
// like torch.bucketize), then the code of that rank.
MOEQUANT_HD uint8_t fp4_encode(float x) {
  constexpr float mid[15] = MOEQUANT_FP4_MIDPOINTS;
  int rank = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) rank += !(x <= mid[i]);
  return static_cast<uint8_t>((kFP4CodeOfRank >> (4 * rank)) & 0xF);
}

// 4-bit code of a value already multiplied by its block's reciprocal scale.
MOEQUANT_HD uint8_t quant4_encode(QuantType t, float x) {
  return t == QuantType::kFP4 ? fp4_encode(x) : nf4_encode(x);
}

// The 16 values of a 4-bit format, indexed by code (host side).
inline const float* codebook_of(QuantType t) { return t == QuantType::kFP4 ? kFP4Values : kNF4Values; }

// ---- int8 row-wise (bitsandbytes int8_vectorwise_quant / _dequant, threshold 0) ------------
// 1/127 as bitsandbytes multiplies it: the Python float 7.874015718698502e-3 rounded to fp32.
constexpr float kInt8InvScale = 7.874015718698502e-3f;

// Multiplier of a row: fp32(127 / row absmax); Inf for an all-zero row, 0 for an Inf row.
MOEQUANT_HD float int8_row_multiplier(float row_absmax) { return 127.0f / row_absmax; }

// int8 of fp32(w) * multiplier: round half to even, then torch's float -> int8 conversion
// (truncate to int32, low byte; NaN, +-Inf and out-of-int32 values give 0). So an all-zero row
// (0 * Inf = NaN) and every element of a row holding Inf or NaN store 0, as bitsandbytes does.
MOEQUANT_HD int8_t int8_encode(float w, float multiplier) {
  const float y = w * multiplier;
#if defined(__CUDA_ARCH__)
  const float r = rintf(y);
#else
  const float r = __builtin_rintf(y);  // default rounding mode: to nearest, ties to even
#endif
  if (!(r >= -2147483648.0f && r < 2147483648.0f)) return 0;
  return static_cast<int8_t>(static_cast<uint8_t>(static_cast<int32_t>(r) & 0xFF));
}

// Dequantized int8 value in fp32 from the code as an (exact) fp32 value: (q * row_absmax) *
// (1/127), two roundings, in that order.
MOEQUANT_HD float int8_decode_value(float q, float row_absmax) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__fmul_rn(q, row_absmax), kInt8InvScale);
#else
  return (q * row_absmax) * kInt8InvScale;
#endif
}

MOEQUANT_HD float int8_decode(int8_t q, float row_absmax) {
  return int8_decode_value(static_cast<float>(q), row_absmax);
}

// ---- double-quantized statistics (bitsandbytes compress_statistics=True) ----------------
// Block absmax values are stored as 8-bit codes of the signed dynamic map, in groups of 256
// blocks with one fp32 scale per group, after subtracting one fp32 offset per matrix.
constexpr int64_t kDoubleQuantGroup = 256;

// bitsandbytes' `create_dynamic_map(signed=True)` as exact fp32 literals (sorted, 256 entries);
// tests/test_formats.py re-derives it from bitsandbytes.
#define MOEQUANT_DYNAMIC_MAP_VALUES \
  { \
  -0.992968738f, -0.978906274f, -0.96484375f, -0.950781226f, -0.936718762f, -0.922656238f, \
  -0.908593774f, -0.89453125f, -0.880468726f, -0.866406262f, -0.852343738f, -0.838281274f, \
  -0.82421875f, -0.810156226f, -0.796093762f, -0.782031238f, -0.767968774f, -0.75390625f, \
  -0.739843726f, -0.725781262f, -0.711718798f, -0.697656274f, -0.68359375f, -0.669531226f, \
  -0.655468762f, -0.641406298f, -0.627343774f, -0.61328125f, -0.599218726f, -0.585156262f, \
  -0.571093798f, -0.557031274f, -0.54296875f, -0.528906226f, -0.514843702f, -0.500781238f, \
  -0.486718714f, -0.47265625f, -0.458593726f, -0.444531262f, -0.430468738f, -0.416406244f, \
  -0.40234375f, -0.388281226f, -0.374218762f, -0.360156238f, -0.346093744f, -0.33203125f, \
  -0.317968726f, -0.303906262f, -0.289843738f, -0.275781274f, -0.26171875f, -0.247656241f, \
  -0.233593747f, -0.219531253f, -0.205468744f, -0.19140625f, -0.177343756f, -0.163281247f, \
  -0.149218753f, -0.135156244f, -0.12109375f, -0.107031256f, -0.0985937491f, -0.0957812592f, \
  -0.0929687545f, -0.0901562497f, -0.0873437524f, -0.0845312476f, -0.0817187577f, -0.078906253f, \
  -0.0760937482f, -0.0732812509f, -0.0704687461f, -0.0676562563f, -0.0648437515f, -0.0620312504f, \
  -0.0592187531f, -0.0564062484f, -0.053593751f, -0.05078125f, -0.047968749f, -0.0451562516f, \
  -0.0423437469f, -0.0395312496f, -0.0367187522f, -0.0339062512f, -0.0310937501f, -0.028281251f, \
  -0.0254687499f, -0.0226562507f, -0.0198437516f, -0.0170312505f, -0.0142187504f, -0.0114062503f, \
  -0.00971874967f, -0.00915624946f, -0.00859375019f, -0.00803124998f, -0.00746874977f, -0.00690625003f, \
  -0.00634374982f, -0.00578125007f, -0.00521875033f, -0.00465624966f, -0.00409374991f, -0.00353124971f, \
  -0.00296874996f, -0.00240624999f, -0.00184375001f, -0.00128124992f, -0.000943750085f, -0.000831249985f, \
  -0.00071875006f, -0.000606250076f, -0.000493750034f, -0.000381250022f, -0.000268750038f, -0.000156250011f, \
  -8.87499991e-05f, -6.62500024e-05f, -4.37499984e-05f, -2.12499981e-05f, -7.7499999e-06f, -3.25000019e-06f, \
  -5.50000038e-07f, 0.0f, 5.50000038e-07f, 3.25000019e-06f, 7.7499999e-06f, 2.12499981e-05f, \
  4.37499984e-05f, 6.62500024e-05f, 8.87499991e-05f, 0.000156250011f, 0.000268750038f, 0.000381250022f, \
  0.000493750034f, 0.000606250076f, 0.00071875006f, 0.000831249985f, 0.000943750085f, 0.00128124992f, \
  0.00184375001f, 0.00240624999f, 0.00296874996f, 0.00353124971f, 0.00409374991f, 0.00465624966f, \
  0.00521875033f, 0.00578125007f, 0.00634374982f, 0.00690625003f, 0.00746874977f, 0.00803124998f, \
  0.00859375019f, 0.00915624946f, 0.00971874967f, 0.0114062503f, 0.0142187504f, 0.0170312505f, \
  0.0198437516f, 0.0226562507f, 0.0254687499f, 0.028281251f, 0.0310937501f, 0.0339062512f, \
  0.0367187522f, 0.0395312496f, 0.0423437469f, 0.0451562516f, 0.047968749f, 0.05078125f, \
  0.053593751f, 0.0564062484f, 0.0592187531f, 0.0620312504f, 0.0648437515f, 0.0676562563f, \
  0.0704687461f, 0.0732812509f, 0.0760937482f, 0.078906253f, 0.0817187577f, 0.0845312476f, \
  0.0873437524f, 0.0901562497f, 0.0929687545f, 0.0957812592f, 0.0985937491f, 0.107031256f, \
  0.12109375f, 0.135156244f, 0.149218753f, 0.163281247f, 0.177343756f, 0.19140625f, \
  0.205468744f, 0.219531253f, 0.233593747f, 0.247656241f, 0.26171875f, 0.275781274f, \
  0.289843738f, 0.303906262f, 0.317968726f, 0.33203125f, 0.346093744f, 0.360156238f, \
  0.374218762f, 0.388281226f, 0.40234375f, 0.416406244f, 0.430468738f, 0.444531262f, \
  0.458593726f, 0.47265625f, 0.486718714f, 0.500781238f, 0.514843702f, 0.528906226f, \
  0.54296875f, 0.557031274f, 0.571093798f, 0.585156262f, 0.599218726f, 0.61328125f, \
  0.627343774f, 0.641406298f, 0.655468762f, 0.669531226f, 0.68359375f, 0.697656274f, \
  0.711718798f, 0.725781262f, 0.739843726f, 0.75390625f, 0.767968774f, 0.782031238f, \
  0.796093762f, 0.810156226f, 0.82421875f, 0.838281274f, 0.852343738f, 0.866406262f, \
  0.880468726f, 0.89453125f, 0.908593774f, 0.922656238f, 0.936718762f, 0.950781226f, \
  0.96484375f, 0.978906274f, 0.992968738f, 1.0f \
  }

constexpr float kDynamicMap[256] = MOEQUANT_DYNAMIC_MAP_VALUES;

// Group absmax of the values to encode: max |x| ignoring NaN (bitsandbytes' CPU quantizer
// sanitizes NaN lanes to 0), starting from 0.
MOEQUANT_HD float dynamic_absmax_step(float running, float x) {
  const float a = x < 0.0f ? -x : x;
  return a > running ? a : running;  // false for NaN: skipped
}

// Dynamic-map code of x / group absmax, bit-identical to bitsandbytes 0.50.2's CPU
// `cquantize_blockwise_cpu_fp32`: the normalized value x * (1 / absmax) is clamped to [-1, 1]
// (NaN -> -1), snapped to a 65536-point grid over [-1, 1] (round half up), and the grid point
// v = -1 + 2i/65535 takes the code of the smallest map midpoint that is not below it (i.e. the
// nearest map value, ties to the lower one, evaluated at the grid point, not at x). `inv_absmax`
// is 1 / absmax, computed once per group; an all-zero group (absmax 0) stores code 0 everywhere
// and is handled by the caller.
MOEQUANT_HD uint8_t dynamic_map_encode(float x, float inv_absmax, const float* map) {
#if defined(__CUDA_ARCH__)
  float v = __fmul_rn(x, inv_absmax);
#else
  float v = x * inv_absmax;
#endif
  v = (v >= -1.0f) ? v : -1.0f;  // NaN -> -1, as _mm256_max_ps(v, -1) returns -1 for NaN
  v = (v <= 1.0f) ? v : 1.0f;
#if defined(__CUDA_ARCH__)
  const float t = __fadd_rn(__fmul_rn(__fmul_rn(__fadd_rn(v, 1.0f), 0.5f), 65535.0f), 0.5f);
  const int32_t grid = static_cast<int32_t>(t);
  const float point = __fadd_rn(-1.0f, __fdiv_rn(2.0f * static_cast<float>(grid), 65535.0f));
#else
  const float t = ((v + 1.0f) * 0.5f) * 65535.0f + 0.5f;
  const int32_t grid = static_cast<int32_t>(t);  // truncation; t is in [0.5, 65535.5]
  const float point = -1.0f + (2.0f * static_cast<float>(grid)) / 65535.0f;
#endif
  // Number of midpoints strictly below `point` (binary search over the 255 fp32 midpoints
  // 0.5 * (map[i] + map[i+1]), as bitsandbytes builds its lookup table).
  int lo = 0, hi = 255;
  while (lo < hi) {
    const int m = (lo + hi) / 2;
#if defined(__CUDA_ARCH__)
    const float mid = __fmul_rn(0.5f, __fadd_rn(map[m], map[m + 1]));
#else
    const float mid = 0.5f * (map[m] + map[m + 1]);
#endif
    if (mid < point) lo = m + 1; else hi = m;
  }
  return static_cast<uint8_t>(lo);
}

// Block absmax decoded from its dynamic-map code: (map[code] * group scale) + matrix offset.
MOEQUANT_HD float dynamic_map_decode(uint8_t code, float scale, float offset, const float* map) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(map[code], scale), offset);
#else
  return map[code] * scale + offset;
#endif
}

// The scale of every block of a stack, plain (`absmax`) or double-quantized (`code`, `scale`,
// `offset`, decoded through `map`). For int8 a "block" is
// one output row. Every kernel reads a block's scale through operator(), so a format is data.
struct BlockScales {
  const float* absmax = nullptr;   // plain: fp32 [matrices, blocks_per_matrix]
  const uint8_t* code = nullptr;   // double quant: uint8 [matrices, blocks_per_matrix]
  const float* scale = nullptr;    // double quant: fp32 [matrices, groups_per_matrix]
  const float* offset = nullptr;   // double quant: fp32 [matrices]
  const float* map = nullptr;      // 256 entries: kDynamicMap on the host, a device copy on the GPU
  int64_t blocks_per_matrix = 0;
  int64_t groups_per_matrix = 0;

  MOEQUANT_HD bool double_quant() const { return code != nullptr; }

  MOEQUANT_HD float operator()(int64_t matrix, int64_t block) const {
    if (code == nullptr) return absmax[matrix * blocks_per_matrix + block];
    return dynamic_map_decode(code[matrix * blocks_per_matrix + block],
                              scale[matrix * groups_per_matrix + block / kDoubleQuantGroup], offset[matrix], map);
  }
};

}  // namespace moequant
