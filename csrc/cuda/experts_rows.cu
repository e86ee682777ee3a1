// Gather (token order -> routing order) and combine (routing order -> token order, summing the
// k slots of a token in a fixed order so results are bitwise reproducible: no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cuda_utils.cuh"
#include "experts_common.cuh"
#include "experts_rows.cuh"

namespace moequant {

constexpr int kRowThreads = 256;

// One CTA per routed row; copies in 16-byte vectors when rows allow, else element-wise.
template <typename vec_t>
__global__ void __launch_bounds__(kRowThreads)
gather_rows_kernel(const vec_t* __restrict__ src, vec_t* __restrict__ dst, const int32_t* __restrict__ sorted_pair,
                   int64_t top_k, int64_t vecs_per_row) {
  const int64_t row = blockIdx.x;
  const int64_t token = sorted_pair[row] / top_k;
  const vec_t* s = src + token * vecs_per_row;
  vec_t* d = dst + row * vecs_per_row;
  for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) d[c] = s[c];
}

at::Tensor gather_rows(const at::Tensor& src_in, const ExpertsRouting& r) {
  const at::Tensor src = src_in.contiguous();
  const int64_t D = src.size(1);
  at::Tensor dst = at::empty({r.num_rows, D}, src.options());
  if (r.num_rows == 0 || D == 0) return dst;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t row_bytes = D * src.element_size();
  const int32_t* sp = r.sorted_pair.const_data_ptr<int32_t>();
  TORCH_CHECK(r.num_rows <= INT32_MAX, "moequant: too many routed rows");
  const dim3 grid(static_cast<unsigned>(r.num_rows));
  if (row_bytes % 16 == 0 && is_aligned(src.const_data_ptr(), 16)) {
    gather_rows_kernel<uint4><<<grid, kRowThreads, 0, stream>>>(
        static_cast<const uint4*>(src.const_data_ptr()), static_cast<uint4*>(dst.mutable_data_ptr()), sp, r.top_k,
        row_bytes / 16);
  } else if (row_bytes % 4 == 0 && is_aligned(src.const_data_ptr(), 4)) {
    gather_rows_kernel<uint32_t><<<grid, kRowThreads, 0, stream>>>(
        static_cast<const uint32_t*>(src.const_data_ptr()), static_cast<uint32_t*>(dst.mutable_data_ptr()), sp,
        r.top_k, row_bytes / 4);
  } else {
    gather_rows_kernel<uint16_t><<<grid, kRowThreads, 0, stream>>>(
        static_cast<const uint16_t*>(src.const_data_ptr()), static_cast<uint16_t*>(dst.mutable_data_ptr()), sp,
        r.top_k, row_bytes / 2);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dst;
}

// One CTA per token; each thread owns kVec consecutive columns (16 bytes of each row where
// row_vector_width allows it) and walks the k slots in order.
template <typename in_t, typename out_t, int kVec>
__global__ void __launch_bounds__(kRowThreads)
combine_rows_kernel(const in_t* __restrict__ rows,
                    const int32_t* __restrict__ pair_position,
                    const int32_t* __restrict__ sorted_expert, const float* __restrict__ pair_weights,
                    const float* __restrict__ bias, out_t* __restrict__ out, int64_t top_k, int64_t num_rows,
                    int64_t D) {
  const int64_t t = blockIdx.x;
  for (int64_t c0 = int64_t{threadIdx.x} * kVec; c0 < D; c0 += int64_t{blockDim.x} * kVec) {
    float acc[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = 0.0f;
#pragma unroll 4
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t p = t * top_k + j;
      const int64_t pos = pair_position[p];
      if (pos >= num_rows) continue;  // sentinel slot
      float v[kVec];
      load_floats<kVec>(rows + pos * D + c0, v);
      if (bias != nullptr) {
        float b[kVec];
        load_floats<kVec>(bias + int64_t{sorted_expert[pos]} * D + c0, b);
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[i] += b[i];
      }
      const float w = pair_weights != nullptr ? pair_weights[p] : 1.0f;  // 1 * v is exact
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] += w * v[i];
    }
    store_floats<kVec>(out + t * D + c0, acc);
  }
}

at::Tensor combine_rows(const at::Tensor& rows, const ExpertsRouting& r, const at::Tensor& pair_weights, const at::Tensor& bias,
                        int64_t num_tokens, at::ScalarType out_dtype) {
  const int64_t D = rows.size(1);
  at::Tensor out = at::empty({num_tokens, D}, rows.options().dtype(out_dtype));
  if (num_tokens == 0 || D == 0) return out;
  TORCH_CHECK(rows.is_contiguous(), "moequant: combine_rows needs contiguous rows");
  TORCH_CHECK(num_tokens <= INT32_MAX, "moequant: too many tokens");
  auto stream = at::cuda::getCurrentCUDAStream();
  MOEQUANT_DISPATCH_EXPERTS_TYPES(rows.scalar_type(), "moequant_combine_rows", [&] {
    using in_t = typename native<scalar_t>::type;
    MOEQUANT_DISPATCH_EXPERTS_TYPES(out_dtype, "moequant_combine_rows_out", [&] {
      using out_t = typename native<scalar_t>::type;
      const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
      // 16 bytes of each input row a thread (the rows are most of the traffic).
      const int width = row_vector_width<in_t>(D, {rows.const_data_ptr(), out.const_data_ptr(), b});
      dispatch_vector_width<in_t>(width, [&](auto vec) {
        combine_rows_kernel<in_t, out_t, decltype(vec)::value>
            <<<static_cast<unsigned>(num_tokens), kRowThreads, 0, stream>>>(
                reinterpret_cast<const in_t*>(rows.const_data_ptr()), r.pair_position.const_data_ptr<int32_t>(),
                r.sorted_expert.const_data_ptr<int32_t>(),
                pair_weights.defined() ? pair_weights.const_data_ptr<float>() : nullptr, b,
                reinterpret_cast<out_t*>(out.mutable_data_ptr()), r.top_k, r.num_rows, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

}  // namespace moequant
