// Small device helpers shared by the experts kernels.
#pragma once

#include <ATen/Dispatch.h>

#include <string>

#include "../error_text.h"
#include "cuda_utils.cuh"

// The dtypes the CUDA experts kernels compute in (hidden_states' dtype).
#define MOEQUANT_DISPATCH_EXPERTS_TYPES(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                         \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace moequant {

// Sum over a CTA of `kThreads` threads in a fixed tree order (bitwise reproducible). Every
// thread gets the result. `scratch` holds kThreads / 32 floats.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_sum needs whole warps");
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

}  // namespace moequant
