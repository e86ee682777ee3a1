// CUDA kernel of quantize_nf4. LANES threads share one NF4 block of LANES*EPL elements: each lane
// loads EPL elements as 8-element (16-byte for 16-bit types) chunks, the group reduces absmax
// with warp shuffles, then each lane encodes its chunks from registers. Chunks are interleaved
// across lanes so that loads and the 4-byte stores of packed codes are coalesced.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "../kernels.h"
#include "../nf4_checks.h"
#include "../nf4_format.h"
#include "cuda_utils.cuh"

namespace moequant {

constexpr int kQuantizeThreads = 256;

template <typename T>
struct alignas(sizeof(T) * 8) Vec8 {
  T v[8];
};

template <typename T, int LANES, int EPL>
__global__ void __launch_bounds__(kQuantizeThreads)
quantize_nf4_kernel(const T* __restrict__ weight, uint8_t* __restrict__ packed,
                    float* __restrict__ absmax, int64_t num_blocks) {
  constexpr int kChunks = EPL / 8;
  constexpr int kGroupsPerCta = kQuantizeThreads / LANES;
  const int lane = threadIdx.x % LANES;
  const int64_t first_group = int64_t{blockIdx.x} * kGroupsPerCta + threadIdx.x / LANES;
  const int64_t group_stride = int64_t{gridDim.x} * kGroupsPerCta;

  for (int64_t b = first_group; b < num_blocks; b += group_stride) {
    const int64_t base = b * (LANES * EPL);
    float x[EPL];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const Vec8<T> chunk = *reinterpret_cast<const Vec8<T>*>(weight + base + (int64_t{c} * LANES + lane) * 8);
#pragma unroll
      for (int i = 0; i < 8; ++i) x[c * 8 + i] = to_float(chunk.v[i]);
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) amax = nf4_absmax_step(amax, x[i]);
    // Butterfly reduction inside the LANES-wide group (LANES divides 32).
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) {
      amax = nf4_absmax_step(amax, __shfl_xor_sync(0xffffffffu, amax, offset, LANES));
    }
    if (lane == 0) absmax[b] = amax;
    const float scale = nf4_block_scale(amax);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      uint32_t word = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t hi = nf4_encode(__fmul_rn(x[c * 8 + 2 * i], scale));
        const uint32_t lo = nf4_encode(__fmul_rn(x[c * 8 + 2 * i + 1], scale));
        word |= ((hi << 4) | lo) << (8 * i);
      }
      *reinterpret_cast<uint32_t*>(packed + base / 2 + (int64_t{c} * LANES + lane) * 4) = word;
    }
  }
}

template <typename T, int LANES, int EPL>
static void launch_quantize(const T* w, uint8_t* p, float* a, int64_t num_blocks) {
  constexpr int kGroupsPerCta = kQuantizeThreads / LANES;
  const int64_t grid = grid_for(num_blocks * LANES, kQuantizeThreads);
  (void)kGroupsPerCta;
  quantize_nf4_kernel<T, LANES, EPL><<<grid, kQuantizeThreads, 0, at::cuda::getCurrentCUDAStream()>>>(w, p, a, num_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& weight, int64_t blocksize) {
  const NF4StackShape shape = check_quantize_args(weight, blocksize);
  TORCH_CHECK(weight.is_cuda(), "moequant.quantize_nf4 (CUDA kernel): weight must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = contiguous_aligned16(weight);
  at::Tensor packed = at::empty_symint(shape.packed_sizes(), w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty_symint(shape.absmax_sizes(blocksize), w.options().dtype(at::kFloat));
  const int64_t num_blocks = shape.numel().expect_int() / blocksize;
  if (num_blocks == 0) return {packed, absmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "quantize_nf4_cuda", [&] {
    using T = typename native<scalar_t>::type;
    const T* wp = reinterpret_cast<const T*>(w.const_data_ptr<scalar_t>());
    uint8_t* pp = packed.mutable_data_ptr<uint8_t>();
    float* ap = absmax.mutable_data_ptr<float>();
    switch (blocksize) {
      case 32: launch_quantize<T, 4, 8>(wp, pp, ap, num_blocks); break;
      case 64: launch_quantize<T, 8, 8>(wp, pp, ap, num_blocks); break;
      case 128: launch_quantize<T, 16, 8>(wp, pp, ap, num_blocks); break;
      case 256: launch_quantize<T, 32, 8>(wp, pp, ap, num_blocks); break;
      case 512: launch_quantize<T, 32, 16>(wp, pp, ap, num_blocks); break;
      case 1024: launch_quantize<T, 32, 32>(wp, pp, ap, num_blocks); break;
      case 2048: launch_quantize<T, 32, 64>(wp, pp, ap, num_blocks); break;
      case 4096: launch_quantize<T, 32, 128>(wp, pp, ap, num_blocks); break;
      default: TORCH_CHECK(false, "moequant.quantize_nf4: unsupported blocksize ", blocksize);
    }
  });
  return {packed, absmax};
}

}  // namespace moequant
