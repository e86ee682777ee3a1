// CUDA kernel of dequant_expert: each thread turns 16 packed bytes (one 16-byte load) into 32
// values (16-byte stores). 32 consecutive elements never straddle an NF4 block (blocksize >= 32),
// so one absmax load serves the whole unit. The codebook lives in shared memory: a run-time
// index into a register array would spill to local memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "../kernels.h"
#include "../nf4_checks.h"
#include "../nf4_format.h"
#include "cuda_utils.cuh"
#include "nf4_dequant.cuh"

namespace moequant {

constexpr int kDequantThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
dequant_nf4_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                   T* __restrict__ out, int64_t num_units, int log2_units_per_block) {
  __shared__ float codebook[16];
  if (threadIdx.x < 16) codebook[threadIdx.x] = kNF4ValuesDevice[threadIdx.x];
  __syncthreads();
  for (int64_t u = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; u < num_units;
       u += int64_t{gridDim.x} * blockDim.x) {
    const uint4 bytes = reinterpret_cast<const uint4*>(packed)[u];
    const float amax = absmax[u >> log2_units_per_block];
    dequant_unit32(bytes, amax, codebook, out + u * 32);
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
  const int64_t matrix_numel = shape.matrix_numel().expect_int();
  const int64_t first = expert.value_or(0);
  const int64_t numel = expert.has_value() ? matrix_numel : shape.numel().expect_int();
  if (numel == 0) return out;
  const uint8_t* p_ptr = p.const_data_ptr<uint8_t>() + first * (matrix_numel / 2);
  const float* a_ptr = a.const_data_ptr<float>() + first * (matrix_numel / blocksize);
  const int64_t num_units = numel / 32;
  const int log2_units_per_block = __builtin_ctzll(static_cast<unsigned long long>(blocksize / 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequant_expert_cuda", [&] {
    using T = typename native<scalar_t>::type;
    dequant_nf4_kernel<T><<<grid_for(num_units, kDequantThreads), kDequantThreads, 0,
                            at::cuda::getCurrentCUDAStream()>>>(
        p_ptr, a_ptr, reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>()), num_units, log2_units_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace moequant
