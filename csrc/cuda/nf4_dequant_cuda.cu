// CUDA kernel of dequant_expert. The output is split into 16-byte chunks (8 bf16/fp16 values
// from 4 packed bytes, or 4 fp32 values from 2). A warp handles 32 * CHUNKS consecutive chunks per
// step, lane l taking chunks l, l + 32, ...: every load and every 16-byte store of the warp is
// contiguous (a thread-per-16-packed-bytes layout would store 64 bytes per thread, four
// half-used sectors per store instruction). All loads of a step are issued before any decode.
// A chunk never straddles an NF4 block (blocksize >= 32), so it needs one absmax. The codebook
// lives in shared memory: a run-time index into a register array would go to local memory.
// H100 (benchmarks/bench_nf4.py): 84-89% of a same-run device-to-device copy; 4/8/16 chunks per
// lane, streaming vs plain stores and prefetching the next tile all landed within 2% of this.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "../kernels.h"
#include "../nf4_checks.h"
#include "../nf4_format.h"
#include "cuda_utils.cuh"
#include "nf4_dequant.cuh"

// fp32, fp16, bf16 only (the checks reject other dtypes; no dead double kernels).
#define MOEQUANT_DISPATCH_NF4_TYPES(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)           \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace moequant {

constexpr int kDequantThreads = 256;

template <typename T, int CHUNKS>
__global__ void __launch_bounds__(kDequantThreads)
dequant_nf4_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                   T* __restrict__ out, int64_t num_chunks, int log2_chunks_per_block) {
  // Packed bytes per chunk: 4 for 16-bit outputs, 2 for fp32.
  using In = std::conditional_t<sizeof(T) == 4, uint16_t, uint32_t>;
  constexpr int kTile = 32 * CHUNKS;
  __shared__ float codebook[16];
  if (threadIdx.x < 16) codebook[threadIdx.x] = kNF4ValuesDevice[threadIdx.x];
  __syncthreads();

  const In* in = reinterpret_cast<const In*>(packed);
  uint4* dst = reinterpret_cast<uint4*>(out);
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t{blockIdx.x} * kDequantThreads + threadIdx.x) / 32;
  const int64_t stride = int64_t{gridDim.x} * (kDequantThreads / 32) * kTile;
  for (int64_t tile = warp * kTile; tile < num_chunks; tile += stride) {
    uint32_t bytes[CHUNKS];
    float amax[CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t g = tile + c * 32 + lane;
      if (g < num_chunks) {
        bytes[c] = in[g];
        amax[c] = absmax[g >> log2_chunks_per_block];
      }
    }
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t g = tile + c * 32 + lane;
      // Streaming (evict-first) stores: the output is not re-read by this kernel; measured
      // +0.5-1% of copy bandwidth over plain stores on H100.
      if (g < num_chunks) __stcs(dst + g, decode_chunk<T>(bytes[c], amax[c], codebook));
    }
  }
}

at::Tensor dequant_expert_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               at::ScalarType dtype, std::optional<int64_t> expert) {
  const NF4StackShape shape = check_dequant_args(packed, absmax, blocksize, dtype, expert);
  TORCH_CHECK(packed.is_cuda(), "moequant.dequant_expert (CUDA kernel): packed must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = contiguous_aligned16(packed);
  const at::Tensor a = absmax.contiguous();
  at::Tensor out = at::empty_symint(dequant_output_sizes(shape, expert), p.options().dtype(dtype));
  // 64-bit offsets: a stack can exceed 2^31 elements.
  const int64_t matrix_numel = shape.matrix_numel().expect_int();
  const int64_t first = expert.value_or(0);
  const int64_t numel = expert.has_value() ? matrix_numel : shape.numel().expect_int();
  if (numel == 0) return out;
  const uint8_t* p_ptr = p.const_data_ptr<uint8_t>() + first * (matrix_numel / 2);
  const float* a_ptr = a.const_data_ptr<float>() + first * (matrix_numel / blocksize);
  MOEQUANT_DISPATCH_NF4_TYPES(dtype, "dequant_expert_cuda", [&] {
    using T = typename native<scalar_t>::type;
    constexpr int kElems = 16 / sizeof(T);  // per chunk
    const int64_t num_chunks = numel / kElems;
    const int log2_chunks_per_block = __builtin_ctzll(static_cast<unsigned long long>(blocksize / kElems));
    // 8 chunks per lane per step: 8 loads in flight before the first decode (measured 1-2% of
    // copy bandwidth over 4 on H100; 16 was no better).
    constexpr int kChunks = 8;
    auto kernel = dequant_nf4_kernel<T, kChunks>;
    constexpr int64_t kChunksPerCta = int64_t{kDequantThreads} * kChunks;
    const int64_t grid = persistent_grid(kernel, kDequantThreads, (num_chunks + kChunksPerCta - 1) / kChunksPerCta);
    kernel<<<grid, kDequantThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p_ptr, a_ptr, reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>()), num_chunks, log2_chunks_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace moequant
