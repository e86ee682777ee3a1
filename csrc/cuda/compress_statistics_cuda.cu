// CUDA kernel of compress_statistics: bitsandbytes' compress_statistics on each matrix's block
// absmax row. The per-matrix offset is torch's fp32 mean on the device (its reduction order
// differs from the CPU's, so an offset may differ by rounding and a few codes with it; tests bound
// that); everything after it is bit-identical to the CPU kernel: one warp per group of 256
// blocks, 8 values per lane, shifted by the offset in fp32, the group absmax (NaN skipped) by
// warp shuffles, then the dynamic-map code. dynamic_map_encode (quant_format.h) snaps a value to
// one of 65536 grid points and binary-searches the map's midpoints at that point: the code is a
// function of the grid index alone, so the kernel computes the index exactly as it does and reads
// the code from a 64 KB table that dynamic_map_encode itself filled, once per device, copied into
// each CTA's shared memory (the binary search's random shared-memory reads of the map conflicted
// in banks: H200, qwen3 gate_up statistics took 94 us; the table read through L1 paid one
// wavefront per distinct line).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "../kernels.h"
#include "../quant_checks.h"
#include "cuda_utils.cuh"
#include "quant_decode.cuh"

namespace moequant {
namespace {

constexpr int kCompressThreads = 1024;
constexpr int kValuesPerLane = kDoubleQuantGroup / 32;
constexpr int kGridPoints = 65536;
constexpr int kCodeTableBytes = kGridPoints;  // one code per grid point

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

// One group's absmax values: value i of a lane is block first + i * 32 + lane (coalesced), 0 past
// the matrix's last block; with the group's matrix and extent.
struct GroupValues {
  float v[kValuesPerLane];
  float offset;
  int64_t matrix, first, n;
};

// Index is uint32_t when every group index fits (a 32-bit division instead of a 64-bit one, which
// is a few hundred instructions per group).
template <typename Index>
__device__ __forceinline__ GroupValues load_group(const float* __restrict__ absmax, const float* __restrict__ offset,
                                                  int64_t g, int64_t blocks, int64_t groups, int lane) {
  GroupValues r;
  r.matrix = static_cast<Index>(g) / static_cast<Index>(groups);
  r.first = (g - r.matrix * groups) * kDoubleQuantGroup;
  r.n = min(int64_t{kDoubleQuantGroup}, blocks - r.first);
  const float* x = absmax + r.matrix * blocks + r.first;
#pragma unroll
  for (int i = 0; i < kValuesPerLane; ++i) {
    const int j = i * 32 + lane;
    r.v[i] = j < r.n ? x[j] : 0.0f;
  }
  r.offset = offset[r.matrix];
  return r;
}

// A warp per group of 256 blocks (grid-stride), the next group's values loaded while this one is
// coded. The code table lives in shared memory: lanes read it at data-dependent indices, and
// through L1 each such read cost a wavefront per distinct 128-byte line (about 32 per warp: by
// that count ~25 us for qwen3 gate_up's 6.3M statistics on an H200, an estimate, where double
// quant measured 46 us over plain quantize); in shared memory it is one wavefront per
// bank conflict (3 to 4 for random indices). One or two CTAs per SM, so the 64 KB fill is paid a
// few hundred times, overlapped with the first group's loads.
template <typename Index>
__global__ void __launch_bounds__(kCompressThreads)
compress_statistics_kernel(const float* __restrict__ absmax, const float* __restrict__ offset,
                           uint8_t* __restrict__ codes, float* __restrict__ scale, int64_t num_groups, int64_t blocks,
                           int64_t groups, const uint4* __restrict__ code_of_grid) {
  extern __shared__ uint4 code_table_words[];
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t{blockIdx.x} * kCompressThreads + threadIdx.x) / 32;
  const int64_t num_warps = int64_t{gridDim.x} * (kCompressThreads / 32);

  GroupValues next{};
  if (warp < num_groups) next = load_group<Index>(absmax, offset, warp, blocks, groups, lane);
  for (int i = threadIdx.x; i < kCodeTableBytes / 16; i += kCompressThreads) code_table_words[i] = code_of_grid[i];
  __syncthreads();
  const uint8_t* code_table = reinterpret_cast<const uint8_t*>(code_table_words);

  for (int64_t g = warp; g < num_groups; g += num_warps) {
    const GroupValues cur = next;
    if (g + num_warps < num_groups) next = load_group<Index>(absmax, offset, g + num_warps, blocks, groups, lane);
    float shifted[kValuesPerLane];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kValuesPerLane; ++i) {
      const int j = i * 32 + lane;
      shifted[i] = j < cur.n ? __fsub_rn(cur.v[i], cur.offset) : 0.0f;
      amax = dynamic_absmax_step(amax, shifted[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) amax = dynamic_absmax_step(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) scale[g] = amax;
    uint8_t* q = codes + cur.matrix * blocks + cur.first;
    const float inv = 1.0f / amax;  // IEEE division (no fast math), as the CPU's
    // Every index is in range (an all-zero group's NaN quotients clamp to -1), so the table reads
    // need no branch and issue back to back.
    uint8_t code[kValuesPerLane];
#pragma unroll
    for (int i = 0; i < kValuesPerLane; ++i) code[i] = code_table[dynamic_grid_index(shifted[i], inv)];
#pragma unroll
    for (int i = 0; i < kValuesPerLane; ++i) {
      const int j = i * 32 + lane;
      if (j < cur.n) q[j] = amax == 0.0f ? uint8_t{0} : code[i];
    }
  }
}

template <typename Index>
void launch_compress_statistics(const float* absmax, const float* offset, uint8_t* codes, float* scale,
                                int64_t num_groups, int64_t blocks, int64_t groups, const uint4* code_of_grid) {
  auto kernel = compress_statistics_kernel<Index>;
  allow_dynamic_smem(kernel, kCodeTableBytes);
  constexpr int kWarpsPerCta = kCompressThreads / 32;
  const int64_t ctas =
      persistent_grid(kernel, kCompressThreads, (num_groups + kWarpsPerCta - 1) / kWarpsPerCta, kCodeTableBytes);
  kernel<<<static_cast<unsigned>(ctas), kCompressThreads, kCodeTableBytes, at::cuda::getCurrentCUDAStream()>>>(
      absmax, offset, codes, scale, num_groups, blocks, groups, code_of_grid);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_statistics_cuda(const at::Tensor& absmax) {
  check_compress_statistics_args(absmax);
  TORCH_CHECK(absmax.is_cuda(), "moequant.compress_statistics (CUDA kernel): absmax must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(absmax.device());
  const at::Tensor a = absmax.contiguous();
  const int64_t blocks = a.size(-1);
  const int64_t groups = (blocks + kDoubleQuantGroup - 1) / kDoubleQuantGroup;
  auto [codes, scale, offset] = empty_compressed_statistics(a);
  const int64_t matrices = offset.numel();  // the leading dims (a.numel() / blocks fails for 0 blocks)
  if (matrices == 0) return {codes, scale, offset};
  // The offset: torch's fp32 mean of each matrix's row (NaN for a row of no blocks, as on CPU).
  at::Tensor offset_rows = offset.view({matrices});
  at::mean_out(offset_rows, a.view({matrices, blocks}), {1});
  const int64_t num_groups = matrices * groups;
  if (num_groups == 0) return {codes, scale, offset};
  const auto* code_of_grid = reinterpret_cast<const uint4*>(code_of_grid_table(absmax.device()));
  auto* launch = num_groups <= int64_t{UINT32_MAX} ? launch_compress_statistics<uint32_t>
                                                   : launch_compress_statistics<uint64_t>;
  launch(a.const_data_ptr<float>(), offset.const_data_ptr<float>(), codes.mutable_data_ptr<uint8_t>(),
         scale.mutable_data_ptr<float>(), num_groups, blocks, groups, code_of_grid);
  return {codes, scale, offset};
}

}  // namespace moequant
