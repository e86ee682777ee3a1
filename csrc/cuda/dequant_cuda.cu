// CUDA kernel of dequant_expert. The output is split into 16-byte chunks (8 bf16/fp16 values
// from 4 packed bytes, or 4 fp32 values from 2); each warp decodes one tile of 32 * kChunks
// consecutive chunks (dequant_warp_tile, nf4_dequant.cuh) and the grid covers the whole output,
// one tile per warp. H200 (benchmarks/nf4_dequant_variants.cu, same-run copy = 1.0): one tile
// per warp 0.94-1.02 against 0.87-0.94 for a persistent grid-stride loop over the same tiles;
// 4/8/16 chunks per lane, 128/256/512 threads, plain stores and TMA bulk stores from shared
// memory all landed within 2% of the grid-stride loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "../kernels.h"
#include "../quant_checks.h"
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
dequant_nf4_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax, T* __restrict__ out,
                   int64_t num_chunks, int log2_chunks_per_block) {
  __shared__ float codebook[16];
  if (threadIdx.x < 16) codebook[threadIdx.x] = kNF4ValuesDevice[threadIdx.x];
  __syncthreads();
  const int64_t warp = (int64_t{blockIdx.x} * kDequantThreads + threadIdx.x) / 32;
  dequant_warp_tile<T, CHUNKS, /*kStreamingStore=*/true>(reinterpret_cast<const PackedChunk<T>*>(packed), absmax,
                                                         reinterpret_cast<uint4*>(out), warp * 32 * CHUNKS, num_chunks,
                                                         log2_chunks_per_block, codebook);
}

at::Tensor dequant_expert_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               at::ScalarType dtype, std::optional<int64_t> expert, c10::string_view quant_type,
                               const std::optional<at::Tensor>& absmax_scale,
                               const std::optional<at::Tensor>& absmax_offset) {
  const QuantType type = parse_quant_type(quant_type);
  const StackShape shape =
      check_dequant_args(packed, absmax, blocksize, dtype, expert, type, absmax_scale, absmax_offset);
  TORCH_CHECK(type == QuantType::kNF4 && !absmax_scale.has_value(), "moequant.dequant_expert: quant_type=\"",
              std::string(quant_type), "\"", absmax_scale.has_value() ? " with double-quantized statistics" : "",
              " is not implemented on CUDA yet");
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
    // 8 chunks per lane: 8 loads in flight before the first decode.
    constexpr int kChunks = 8;
    constexpr int64_t kChunksPerCta = int64_t{kDequantThreads} * kChunks;
    const int64_t grid = (num_chunks + kChunksPerCta - 1) / kChunksPerCta;  // < 2^31 for any stack below 2^44 values
    dequant_nf4_kernel<T, kChunks><<<grid, kDequantThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p_ptr, a_ptr, reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>()), num_chunks, log2_chunks_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace moequant
