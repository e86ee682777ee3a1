// CUDA kernel of compress_statistics: bitsandbytes' compress_statistics on each matrix's block
// absmax row. The per-matrix offset is torch's fp32 mean on the device (its reduction order
// differs from the CPU's, so an offset may differ by rounding and a few codes with it; tests bound
// that); everything after it is bit-identical to the CPU kernel: one warp per group of 256
// blocks, 8 values per lane, shifted by the offset in fp32, the group absmax (NaN skipped) by
// warp shuffles, then the dynamic-map code. dynamic_map_encode (quant_format.h) snaps a value to
// one of 65536 grid points and binary-searches the map's midpoints at that point: the code is a
// function of the grid index alone, so the kernel computes the index exactly as it does and reads
// the code from a 64 KB table that dynamic_map_encode itself filled, once per device (the binary
// search's random shared-memory reads of the map conflicted in banks: H200, qwen3 gate_up
// statistics took 94 us).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>
#include <unordered_map>

#include "../kernels.h"
#include "../quant_checks.h"
#include "cuda_utils.cuh"
#include "quant_decode.cuh"

namespace moequant {
namespace {

constexpr int kCompressThreads = 256;
constexpr int kValuesPerLane = kDoubleQuantGroup / 32;
constexpr int kGridPoints = 65536;

// The grid index of x / group absmax, with dynamic_map_encode's fp32 operations (round to nearest,
// no contraction), then truncation.
MOEQUANT_HD int32_t dynamic_grid_index(float x, float inv_absmax) {
#if defined(__CUDA_ARCH__)
  float v = __fmul_rn(x, inv_absmax);
#else
  float v = x * inv_absmax;
#endif
  v = (v >= -1.0f) ? v : -1.0f;  // NaN -> -1
  v = (v <= 1.0f) ? v : 1.0f;
#if defined(__CUDA_ARCH__)
  return static_cast<int32_t>(__fadd_rn(__fmul_rn(__fmul_rn(__fadd_rn(v, 1.0f), 0.5f), 65535.0f), 0.5f));
#else
  return static_cast<int32_t>(((v + 1.0f) * 0.5f) * 65535.0f + 0.5f);
#endif
}

// code_of_grid[i] = dynamic_map_encode of a value whose grid index is i (the grid point itself,
// checked), on `device`; built on the host once per device.
const uint8_t* code_of_grid_table(const at::Device& device) {
  static std::mutex mutex;
  static std::unordered_map<int, at::Tensor> tables;
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& table = tables[device.index()];
  if (!table.defined()) {
    at::Tensor host = at::empty({kGridPoints}, at::TensorOptions().dtype(at::kByte));
    uint8_t* codes = host.mutable_data_ptr<uint8_t>();
    for (int32_t i = 0; i < kGridPoints; ++i) {
      const float point = -1.0f + (2.0f * static_cast<float>(i)) / 65535.0f;
      TORCH_INTERNAL_ASSERT(dynamic_grid_index(point, 1.0f) == i, "moequant: grid point ", i, " does not map back");
      codes[i] = dynamic_map_encode(point, 1.0f, kDynamicMap);
    }
    table = host.to(device);
  }
  return table.const_data_ptr<uint8_t>();
}

__global__ void __launch_bounds__(kCompressThreads)
compress_statistics_kernel(const float* __restrict__ absmax, const float* __restrict__ offset,
                           uint8_t* __restrict__ codes, float* __restrict__ scale, int64_t matrices, int64_t blocks,
                           int64_t groups, const uint8_t* __restrict__ code_of_grid) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t{blockIdx.x} * kCompressThreads + threadIdx.x) / 32;
  const int64_t num_warps = int64_t{gridDim.x} * (kCompressThreads / 32);
  for (int64_t g = warp; g < matrices * groups; g += num_warps) {
    const int64_t e = g / groups, first = (g % groups) * kDoubleQuantGroup;
    const int64_t n = min(int64_t{kDoubleQuantGroup}, blocks - first);
    const float* x = absmax + e * blocks + first;
    const float off = offset[e];
    float shifted[kValuesPerLane];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kValuesPerLane; ++i) {
      const int j = i * 32 + lane;
      shifted[i] = j < n ? __fsub_rn(x[j], off) : 0.0f;
      amax = dynamic_absmax_step(amax, shifted[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) amax = dynamic_absmax_step(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) scale[g] = amax;
    uint8_t* q = codes + e * blocks + first;
    const float inv = 1.0f / amax;  // IEEE division (no fast math), as the CPU's
#pragma unroll
    for (int i = 0; i < kValuesPerLane; ++i) {
      const int j = i * 32 + lane;
      if (j < n) q[j] = amax == 0.0f ? uint8_t{0} : __ldg(code_of_grid + dynamic_grid_index(shifted[i], inv));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_statistics_cuda(const at::Tensor& absmax) {
  check_compress_statistics_args(absmax);
  TORCH_CHECK(absmax.is_cuda(), "moequant.compress_statistics (CUDA kernel): absmax must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(absmax.device());
  const at::Tensor a = absmax.contiguous();
  const int64_t blocks = a.size(-1);
  const int64_t groups = (blocks + kDoubleQuantGroup - 1) / kDoubleQuantGroup;
  const int64_t matrices = blocks == 0 ? a.numel() : a.numel() / blocks;
  std::vector<int64_t> scale_sizes = a.sizes().vec();
  scale_sizes.back() = groups;
  at::Tensor codes = at::empty_like(a, a.options().dtype(at::kByte));
  at::Tensor scale = at::empty(scale_sizes, a.options());
  at::Tensor offset = at::empty(a.sizes().slice(0, a.dim() - 1), a.options());
  if (matrices == 0) return {codes, scale, offset};
  // The offset: torch's fp32 mean of each matrix's row.
  at::Tensor offset_rows = offset.view({matrices});
  at::mean_out(offset_rows, a.view({matrices, blocks}), {1});
  const int64_t warps_needed = matrices * groups;
  const int64_t ctas = std::min<int64_t>((warps_needed + kCompressThreads / 32 - 1) / (kCompressThreads / 32),
                                         int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 8);
  compress_statistics_kernel<<<static_cast<unsigned>(ctas), kCompressThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      a.const_data_ptr<float>(), offset.const_data_ptr<float>(), codes.mutable_data_ptr<uint8_t>(),
      scale.mutable_data_ptr<float>(), matrices, blocks, groups, code_of_grid_table(absmax.device()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scale, offset};
}

}  // namespace moequant
