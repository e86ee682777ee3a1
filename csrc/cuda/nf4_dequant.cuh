// Device-side NF4 decoding of 32-element units, shared by dequant_expert and the experts kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../nf4_format.h"
#include "cuda_utils.cuh"

namespace moequant {

__device__ __constant__ static const float kNF4ValuesDevice[16] = MOEQUANT_NF4_VALUES;

template <typename T>
struct alignas(16) Vec16B {
  static constexpr int kElems = 16 / sizeof(T);
  T v[kElems];
};

// Decodes 16 packed bytes (32 codes, high nibble first) scaled by `amax` into out[0..31].
// `codebook` points to the 16 NF4 values in shared memory. `out` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void dequant_unit32(uint4 bytes, float amax, const float* codebook, T* out) {
  const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
  constexpr int kPerStore = Vec16B<T>::kElems;
  float vals[32];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t byte = (words[w] >> (8 * i)) & 0xFFu;
      vals[w * 8 + 2 * i] = __fmul_rn(codebook[byte >> 4], amax);
      vals[w * 8 + 2 * i + 1] = __fmul_rn(codebook[byte & 0xFu], amax);
    }
  }
#pragma unroll
  for (int s = 0; s < 32 / kPerStore; ++s) {
    Vec16B<T> vec;
#pragma unroll
    for (int i = 0; i < kPerStore; ++i) vec.v[i] = from_float<T>(vals[s * kPerStore + i]);
    reinterpret_cast<Vec16B<T>*>(out)[s] = vec;
  }
}

}  // namespace moequant
