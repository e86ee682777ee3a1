// The fused 4-bit grouped GEMM on Hopper (sm_90a): the [N, K] product with the decoded weights as
// wgmma's register operand, the [K, N] product with them as its shared-memory operand. See
// experts_nf4_wgmma.cu.
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

// Whether the [N, K] wgmma kernel can take a stored [N, K] matrix: it indexes codes and block
// scales within one expert's matrix in 32 bits (the mma.sync kernel takes larger ones).
constexpr bool nf4_wgmma_nk_indexes(int64_t N, int64_t K) { return N * K < (int64_t{1} << 32); }

// out[rows of each tile] = in[rows] @ S_e^T for stored S_e = [N, K] (K % 64 == 0, N % 8 == 0),
// over `num_tiles` row tiles of `height` rows (device array `tiles`), any 4-bit format (`args`).
// T = __nv_bfloat16 or __half.
// Which [K, N] products (stored S_e = [K, N]: the backward of the standard layout) run on the
// wgmma kernel too, where nf4_wgmma_nk_enabled(): row-tile lists of at least the returned height
// (0: none; shorter lists run the mma.sync kernel). MOEQUANT_KN_WGMMA (read once per process):
// unset, 128; 0, none; 1, every height; 16, 32, 64 or 128, lists of that height and taller.
int nf4_wgmma_kn_min_height();

template <typename T>
void launch_nf4_wgmma_nk(const at::Tensor& in, at::Tensor& out, const uint8_t* packed, const Quant4Args& args,
                         const RowTile* tiles, int64_t num_tiles, int height, int64_t N, int64_t K,
                         int log2_blocksize);

// out[rows of each tile] = in[rows] @ S_e for stored S_e = [K, N] (K % 64 == 0, N % 32 == 0), the
// same row tiles and formats as launch_nf4_wgmma_nk.
template <typename T>
void launch_nf4_wgmma_kn(const at::Tensor& in, at::Tensor& out, const uint8_t* packed, const Quant4Args& args,
                         const RowTile* tiles, int64_t num_tiles, int height, int64_t N, int64_t K,
                         int log2_blocksize);

}  // namespace moequant
