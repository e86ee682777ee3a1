// The fused 4-bit grouped GEMM's [N, K] product on Hopper (sm_90a): wgmma with the decoded weights
// as the register operand. See experts_nf4_wgmma.cu.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "experts_nf4_tiles.cuh"

namespace moequant {

// Whether this build and device run the wgmma kernel: an sm_90a cubin is in the build
// (MOEQUANT_HAS_SM90A, set by setup.py), the current device is compute capability 9.0, and
// MOEQUANT_EXPERTS_WGMMA is not "0" (which keeps the mma.sync kernel, for comparison).
bool nf4_wgmma_nk_enabled();

// Row-tile heights the wgmma kernel is built for (its wgmma N).
constexpr bool nf4_wgmma_height_supported(int height) {
  return height == 16 || height == 32 || height == 64 || height == 128;
}

// out[rows of each tile] = in[rows] @ S_e^T for stored S_e = [N, K] (K % 64 == 0, N % 8 == 0),
// over `num_tiles` row tiles of `height` rows (device array `tiles`), any 4-bit format (`args`).
// T = __nv_bfloat16 or __half.
template <typename T>
void launch_nf4_wgmma_nk(const at::Tensor& in, at::Tensor& out, const uint8_t* packed, const Quant4Args& args,
                         const RowTile* tiles, int64_t num_tiles, int height, int64_t N, int64_t K,
                         int log2_blocksize);

}  // namespace moequant
