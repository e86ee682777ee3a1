// Routing: keys = clamped expert ids, integer histogram (atomics on integers are deterministic),
// CUB stable radix sort of (key, pair) and the inverse permutation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cub/cub.cuh>

#include <string>

#include "cuda_utils.cuh"
#include "experts_routing.cuh"

namespace moequant {

constexpr int kRoutingThreads = 256;

// keys[p] = min(index[p], E) as int32 and pairs[p] = p (the sort's values); counts[key]++;
// counts[E + 1] flags a negative index.
template <typename index_t>
__global__ void __launch_bounds__(kRoutingThreads)
routing_keys_kernel(const index_t* __restrict__ index, int32_t* __restrict__ keys, int32_t* __restrict__ pairs,
                    int32_t* __restrict__ counts, int64_t num_pairs, int64_t num_experts) {
  for (int64_t p = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; p < num_pairs;
       p += int64_t{gridDim.x} * blockDim.x) {
    pairs[p] = static_cast<int32_t>(p);
    const int64_t e = static_cast<int64_t>(index[p]);
    if (e < 0) {
      atomicOr(&counts[num_experts + 1], 1);
      keys[p] = static_cast<int32_t>(num_experts);
      continue;
    }
    const int32_t key = static_cast<int32_t>(e < num_experts ? e : num_experts);
    keys[p] = key;
    atomicAdd(&counts[key], 1);
  }
}

__global__ void __launch_bounds__(kRoutingThreads)
inverse_permutation_kernel(const int32_t* __restrict__ sorted_pair, int32_t* __restrict__ position,
                           int64_t num_pairs) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < num_pairs;
       i += int64_t{gridDim.x} * blockDim.x) {
    position[sorted_pair[i]] = static_cast<int32_t>(i);
  }
}

ExpertsRouting route_pairs(const char* op, const at::Tensor& top_k_index, int64_t num_experts) {
  TORCH_CHECK(num_experts >= 1 && num_experts < (int64_t{1} << 30), op,
              ": the number of experts E must be in [1, 2^30), got ", std::to_string(num_experts));
  const at::Tensor index = top_k_index.contiguous();
  ExpertsRouting r;
  r.num_pairs = index.numel();
  r.top_k = index.size(1);
  r.num_experts = num_experts;
  TORCH_CHECK(r.num_pairs < (int64_t{1} << 31), op, ": T*k must be below 2^31, got ", std::to_string(r.num_pairs));
  // Checked before the routing launches anything (the capture stays valid for the caller to end).
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None, op,
              ": this call cannot be captured in a CUDA graph: it takes the routed path, which reads the rows per "
              "expert on the host (", std::to_string(r.num_pairs), " (token, slot) pairs). Captured calls must be "
              "without gradients, in the stored [out, in] layout (transposed=False), with rows of whole 32-weight "
              "units and at most 65535 pairs: those run the decode GEMV, which never synchronizes");
  const auto int_opts = index.options().dtype(at::kInt);
  const int64_t P = r.num_pairs;
  auto stream = at::cuda::getCurrentCUDAStream();

  // counts[0..E-1]: rows per expert, counts[E]: sentinels, counts[E+1]: negative-index flag.
  at::Tensor counts = at::zeros({num_experts + 2}, int_opts);
  at::Tensor keys = at::empty({P}, int_opts), pairs = at::empty({P}, int_opts);
  r.sorted_expert = at::empty({P}, int_opts);
  r.sorted_pair = at::empty({P}, int_opts);
  r.pair_position = at::empty({P}, int_opts);
  if (P > 0) {
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "moequant_routing_keys", [&] {
      routing_keys_kernel<index_t><<<grid_for(P, kRoutingThreads), kRoutingThreads, 0, stream>>>(
          index.const_data_ptr<index_t>(), keys.mutable_data_ptr<int32_t>(), pairs.mutable_data_ptr<int32_t>(),
          counts.mutable_data_ptr<int32_t>(), P, num_experts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // The one host sync of an experts call. The counts leave for pinned memory as soon as they are
  // counted, and the host waits for them only once the sort, the inverse permutation and the
  // group ends are queued: the GPU works through those while the host waits and then plans the
  // products. (Waiting at the end of the queue left the GPU idle from there until the host's
  // next launch: 0.1-0.3 ms per call on the profiles of olmoe and mixtral at T=4096.)
  const at::Tensor counts_host =
      at::empty({num_experts + 2}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  C10_CUDA_CHECK(cudaMemcpyAsync(counts_host.mutable_data_ptr<int32_t>(), counts.const_data_ptr<int32_t>(),
                                 (num_experts + 2) * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  at::cuda::CUDAEvent counts_ready;
  counts_ready.record(stream);
  if (P > 0) {
    const int end_bit = 64 - __builtin_clzll(static_cast<unsigned long long>(num_experts));  // keys <= E
    size_t temp_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, temp_bytes, keys.const_data_ptr<int32_t>(), r.sorted_expert.mutable_data_ptr<int32_t>(),
        pairs.const_data_ptr<int32_t>(), r.sorted_pair.mutable_data_ptr<int32_t>(), static_cast<int>(P), 0,
        end_bit, stream));
    at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, index.options().dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        temp.mutable_data_ptr(), temp_bytes, keys.const_data_ptr<int32_t>(),
        r.sorted_expert.mutable_data_ptr<int32_t>(), pairs.const_data_ptr<int32_t>(),
        r.sorted_pair.mutable_data_ptr<int32_t>(), static_cast<int>(P), 0, end_bit, stream));
    inverse_permutation_kernel<<<grid_for(P, kRoutingThreads), kRoutingThreads, 0, stream>>>(
        r.sorted_pair.const_data_ptr<int32_t>(), r.pair_position.mutable_data_ptr<int32_t>(), P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  r.expert_rows = counts.narrow(0, 0, num_experts);
  r.group_ends = at::cumsum(r.expert_rows, 0, at::kInt);
  counts_ready.synchronize();
  const int32_t* c = counts_host.const_data_ptr<int32_t>();
  TORCH_CHECK(c[num_experts + 1] == 0, op, ": top_k_index holds a negative expert id; ids must be in [0, ",
              std::to_string(num_experts), ") (or >= ", std::to_string(num_experts),
              " for sentinel slots that contribute zero)");
  r.row_offsets.assign(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) {
    r.row_offsets[e + 1] = r.row_offsets[e] + c[e];
    if (c[e] > 0) r.active_experts.push_back(static_cast<int32_t>(e));
  }
  r.num_rows = r.row_offsets[num_experts];
  return r;
}

}  // namespace moequant
