#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "experts_common.cuh"
#include "experts_low_rank.cuh"

namespace moequant {

constexpr int kLowRankThreads = 256;

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

constexpr int kLowRankRows = 4;  // rows per thread, sharing each load of the expert's factor

// acc[i] += u[i] @ m for kRows rows of u (row stride u_stride) and the kVec columns of m (row
// stride out_dim), one load of m per k for all the rows.
template <typename T, int kVec, int kRows>
__device__ __forceinline__ void low_rank_dot(const T* __restrict__ m, const T* __restrict__ u, int64_t u_stride,
                                             int rank, int64_t out_dim, float (&acc)[kRows][kVec]) {
#pragma unroll 4
  for (int k = 0; k < rank; ++k) {
    const Pack<T, kVec> mk = *reinterpret_cast<const Pack<T, kVec>*>(m + int64_t{k} * out_dim);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const float uk = to_float(u[i * u_stride + k]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[i][j] = fmaf(uk, to_float(mk.v[j]), acc[i][j]);
    }
  }
}

// row[col + j] += scale * acc[j], summed in fp32 and rounded once.
template <typename T, int kVec>
__device__ __forceinline__ void add_to_row(T* row, int64_t col, float scale, const float (&acc)[kVec]) {
  Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(row + col);
#pragma unroll
  for (int j = 0; j < kVec; ++j) p.v[j] = from_float<T>(fmaf(scale, acc[j], to_float(p.v[j])));
  *reinterpret_cast<Pack<T, kVec>*>(row + col) = p;
}

// A thread owns kVec consecutive columns of kLowRankRows consecutive rows, consecutive threads
// along the columns: the warp's loads of mats[e][k] are one contiguous segment, shared by the
// thread's rows when they belong to one expert (rows are sorted by expert, so almost always),
// u[row][k] is a broadcast, and the expert's factor stays in L1/L2 across its rows.
template <typename T, int kVec>
__global__ void __launch_bounds__(kLowRankThreads)
add_low_rank_kernel(T* __restrict__ rows_out, int64_t row_stride, const T* __restrict__ u, int64_t u_stride, const T* __restrict__ mats,
                    const int32_t* __restrict__ row_expert, int64_t rows, int64_t out_dim, int rank, float scale) {
  const int64_t packs_per_row = out_dim / kVec;
  const int64_t total = (rows + kLowRankRows - 1) / kLowRankRows * packs_per_row;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row0 = i / packs_per_row * kLowRankRows, col = i % packs_per_row * kVec;
    const int n = static_cast<int>(min(int64_t{kLowRankRows}, rows - row0));
    const int32_t e = row_expert[row0];
    if (n == kLowRankRows && row_expert[row0 + n - 1] == e) {
      float acc[kLowRankRows][kVec] = {};
      low_rank_dot<T, kVec, kLowRankRows>(mats + int64_t{e} * rank * out_dim + col, u + row0 * u_stride, u_stride,
                                          rank, out_dim, acc);
#pragma unroll
      for (int r = 0; r < kLowRankRows; ++r) {
        add_to_row<T, kVec>(rows_out + (row0 + r) * row_stride, col, scale, acc[r]);
      }
    } else {  // the rows straddle two experts, or the last rows
      for (int r = 0; r < n; ++r) {
        float acc[1][kVec] = {};
        low_rank_dot<T, kVec, 1>(mats + int64_t{row_expert[row0 + r]} * rank * out_dim + col,
                                 u + (row0 + r) * u_stride, u_stride, rank, out_dim, acc);
        add_to_row<T, kVec>(rows_out + (row0 + r) * row_stride, col, scale, acc[0]);
      }
    }
  }
}

void add_low_rank_rows(at::Tensor& rows, const LowRankTerm& term, const ExpertsRouting& r) {
  const int64_t n = rows.size(0), out_dim = rows.size(1), rank = term.u.size(1);
  // Rows need not be packed (torch._grouped_mm pads its output rows to 16-byte multiples).
  TORCH_CHECK(rows.dim() == 2 && rows.stride(1) == 1, "moequant: add_low_rank_rows needs rows of unit column stride");
  TORCH_CHECK(term.u.stride(1) == 1 && term.mats.is_contiguous() && term.u.scalar_type() == rows.scalar_type() &&
                  term.mats.scalar_type() == rows.scalar_type() && term.mats.size(1) == rank &&
                  term.mats.size(2) == out_dim && term.u.size(0) == n,
              "moequant: add_low_rank_rows needs u [R, r] (unit column stride) and mats [E, r, ", out_dim,
              "] (contiguous) in ",
              rows.scalar_type());
  if (n == 0 || out_dim == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  MOEQUANT_DISPATCH_EXPERTS_TYPES(rows.scalar_type(), "moequant_add_low_rank_rows", [&] {
    using T = typename native<scalar_t>::type;
    constexpr int kVec = 16 / sizeof(T);
    const auto launch = [&](auto kernel, int vec) {
      const int64_t threads_needed = (n + kLowRankRows - 1) / kLowRankRows * (out_dim / vec);
      kernel<<<static_cast<unsigned>(grid_for(threads_needed, kLowRankThreads)), kLowRankThreads, 0, stream>>>(
          reinterpret_cast<T*>(rows.mutable_data_ptr()), rows.stride(0),
          reinterpret_cast<const T*>(term.u.const_data_ptr()), term.u.stride(0),
          reinterpret_cast<const T*>(term.mats.const_data_ptr()), r.sorted_expert.const_data_ptr<int32_t>(), n,
          out_dim, static_cast<int>(rank), term.scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool vectorized = out_dim % kVec == 0 && rows.stride(0) % kVec == 0 && is_aligned(rows.const_data_ptr(), 16) &&
                            is_aligned(term.mats.const_data_ptr(), 16);
    if (vectorized) {
      launch(add_low_rank_kernel<T, kVec>, kVec);
    } else {
      launch(add_low_rank_kernel<T, 1>, 1);
    }
  });
}

}  // namespace moequant
