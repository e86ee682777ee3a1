// Device-side NF4 decoding of 16-byte output chunks, shared by dequant_expert and the experts kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../nf4_format.h"
#include "cuda_utils.cuh"

namespace moequant {

__device__ __constant__ static const float kNF4ValuesDevice[16] = MOEQUANT_NF4_VALUES;

// Two decoded values rounded to nearest-even and packed into 4 bytes.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Decodes one chunk (the codes of `bytes`, high nibble first) into a 16-byte vector: 4 packed
// bytes -> 8 16-bit values, or 2 packed bytes (low half of `bytes`) -> 4 fp32 values.
template <typename T>
__device__ __forceinline__ uint4 decode_chunk(uint32_t bytes, float amax, const float* codebook) {
  uint4 out;
  uint32_t* o = reinterpret_cast<uint32_t*>(&out);
  if constexpr (std::is_same_v<T, float>) {
    // 2 bytes -> 4 fp32 values.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t code = (bytes >> (i % 2 == 0 ? 8 * (i / 2) + 4 : 8 * (i / 2))) & 0xFu;
      o[i] = __float_as_uint(__fmul_rn(codebook[code], amax));
    }
  } else {
    // 4 bytes -> 8 16-bit values.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float hi = __fmul_rn(codebook[(bytes >> (8 * i + 4)) & 0xFu], amax);
      const float lo = __fmul_rn(codebook[(bytes >> (8 * i)) & 0xFu], amax);
      o[i] = pack2<T>(hi, lo);
    }
  }
  return out;
}

}  // namespace moequant
