#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "experts_common.cuh"
#include "experts_low_rank.cuh"
#include "quant_decode.cuh"  // pack2

namespace moequant {

constexpr int kLowRankThreads = 256;
constexpr int kTileRows = 16;               // one mma row block
constexpr int kTileCols = 32;               // four mma column blocks per warp
constexpr int kColBlocks = kTileCols / 8;

// Runs f(row0, col0, n_rows) for every kRows x kCols tile of a rows x out_dim matrix that this warp
// owns: tiles are numbered row-major and dealt to the grid's warps in turn (grid-stride).
template <int kThreads, int kRows, int kCols, typename F>
__device__ __forceinline__ void for_each_warp_tile(int64_t rows, int64_t out_dim, F&& f) {
  const int64_t col_tiles = (out_dim + kCols - 1) / kCols;
  const int64_t tiles = (rows + kRows - 1) / kRows * col_tiles;
  const int64_t warps = int64_t{gridDim.x} * (kThreads / 32);
  for (int64_t t = int64_t{blockIdx.x} * (kThreads / 32) + threadIdx.x / 32; t < tiles; t += warps) {
    const int64_t row0 = t / col_tiles * kRows;
    f(row0, t % col_tiles * kCols, static_cast<int>(min(int64_t{kRows}, rows - row0)));
  }
}

// Elements k and k + 1 of p as one mma operand register (zero past `rank` or when !valid).
// kPairs: p and k are 4-byte aligned and rank is even, so the pair is one load.
template <typename T, bool kPairs>
__device__ __forceinline__ uint32_t load_pair(const T* p, int k, int rank, bool valid) {
  if (!valid || k >= rank) return 0;
  if constexpr (kPairs) {
    return *reinterpret_cast<const uint32_t*>(p + k);
  } else {
    return pack2<T>(to_float(p[k]), k + 1 < rank ? to_float(p[k + 1]) : 0.0f);
  }
}

// The mma A fragment of u for the k16 step holding element k (= k0 + 2 q): rows g (u_lo) and
// g + 8 (u_hi) of a 16-row block, zero for rows outside the current expert's.
template <typename T, bool kPairs>
__device__ __forceinline__ void load_u_fragment(uint32_t (&a)[4], const T* u_lo, const T* u_hi, int k, int rank,
                                                bool lo_in, bool hi_in) {
  a[0] = load_pair<T, kPairs>(u_lo, k, rank, lo_in);
  a[1] = load_pair<T, kPairs>(u_hi, k, rank, hi_in);
  a[2] = load_pair<T, kPairs>(u_lo, k + 8, rank, lo_in);
  a[3] = load_pair<T, kPairs>(u_hi, k + 8, rank, hi_in);
}

// rows[i] += scale * u[i] @ mats[e(i)]^T on the tensor cores (bf16/fp16). A warp owns a tile of
// 16 rows x 32 columns: per k16 step of the rank, one A fragment of u and four B fragments of the
// expert's factor make four m16n8k16 products. Rows are sorted by expert, so a tile almost always
// holds one expert; where it straddles several, each expert's product runs with the other rows of
// A zeroed. fp32 accumulation, one rounding when added to the row.
template <typename T, bool kPairs>
__global__ void __launch_bounds__(kLowRankThreads, 2)
add_low_rank_mma_kernel(T* __restrict__ rows_out, int64_t row_stride, const T* __restrict__ u, int64_t u_stride,
                        const T* __restrict__ mats, const int32_t* __restrict__ row_expert, int64_t rows,
                        int64_t out_dim, int rank, float scale) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  for_each_warp_tile<kLowRankThreads, kTileRows, kTileCols>(rows, out_dim, [&](int64_t row0, int64_t col0, int n_rows) {
    const T* u_lo = u + (row0 + g) * u_stride;
    const T* u_hi = u + (row0 + g + 8) * u_stride;
    // This lane's output pair (col, col + 1) in row g + 8h of column block nb, and which of the
    // two exist.
    struct OutPair {
      T* p;
      bool first, second;
    };
    const auto out_pair = [&](int nb, int h) {
      const int r = g + 8 * h;
      const int64_t col = col0 + nb * 8 + 2 * q;
      const bool first = r < n_rows && col < out_dim;
      return OutPair{rows_out + (row0 + r) * row_stride + col, first, first && col + 1 < out_dim};
    };
    // The tile's own rows are loaded first, so their DRAM latency overlaps the factor loads and
    // the products; lane l holds the expert of row l % 16, read by the others through shuffles.
    uint32_t prev[kColBlocks][2];  // (col, col + 1) of rows g and g + 8, packed
#pragma unroll
    for (int nb = 0; nb < kColBlocks; ++nb) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const OutPair o = out_pair(nb, h);
        if constexpr (kPairs) {
          prev[nb][h] = o.first ? *reinterpret_cast<const uint32_t*>(o.p) : 0u;
        } else {
          prev[nb][h] = pack2<T>(o.first ? to_float(o.p[0]) : 0.0f, o.second ? to_float(o.p[1]) : 0.0f);
        }
      }
    }
    const int32_t my_expert = (lane & 15) < n_rows ? row_expert[row0 + (lane & 15)] : -1;
    float acc[kColBlocks][4] = {};
    for (int first = 0; first < n_rows;) {  // one expert's rows [first, last) at a time
      const int32_t e = __shfl_sync(0xffffffffu, my_expert, first);
      const unsigned rows_of_e = __ballot_sync(0xffffffffu, lane < 16 && my_expert == e);
      const int last = 32 - __clz(rows_of_e);  // rows are sorted: [first, last) is all of e
      const bool lo_in = g >= first && g < last, hi_in = g + 8 >= first && g + 8 < last;
      const T* m = mats + int64_t{e} * out_dim * rank;
      for (int k0 = 0; k0 < rank; k0 += 16) {
        uint32_t a[4];
        load_u_fragment<T, kPairs>(a, u_lo, u_hi, k0 + 2 * q, rank, lo_in, hi_in);
#pragma unroll
        for (int nb = 0; nb < kColBlocks; ++nb) {
          const int64_t col = col0 + nb * 8 + g;
          const T* mc = m + col * rank;
          mma_16816<T>(acc[nb], a, load_pair<T, kPairs>(mc, k0 + 2 * q, rank, col < out_dim),
                       load_pair<T, kPairs>(mc, k0 + 2 * q + 8, rank, col < out_dim));
        }
      }
      first = last;
    }
#pragma unroll
    for (int nb = 0; nb < kColBlocks; ++nb) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const OutPair o = out_pair(nb, h);
        if (!o.first) continue;
        const T* p = reinterpret_cast<const T*>(&prev[nb][h]);
        const float v0 = fmaf(scale, acc[nb][2 * h], to_float(p[0]));
        const float v1 = fmaf(scale, acc[nb][2 * h + 1], to_float(p[1]));
        if constexpr (kPairs) {
          *reinterpret_cast<uint32_t*>(o.p) = pack2<T>(v0, v1);
        } else {
          o.p[0] = from_float<T>(v0);
          if (o.second) o.p[1] = from_float<T>(v1);
        }
      }
    }
  });
}

// The streaming kernel: the same products, with each warp's tile (32 rows x 64 columns, two mma
// row blocks) moved through registers as 16-byte vectors, all of a tile's row loads issued before
// anything waits on them: 4 KB in flight per warp instead of 1 KB (64 KB an SM at 16 warps of about
// 120 registers, no spills), so the kernel runs at DRAM bandwidth rather than at DRAM latency.
// The vectors fit the accumulator layout because an mma's output columns are whichever columns
// of the factor its B fragment is given: position nb * 8 + 2q + j (nb < 8) of the product holds
// tile column (nb / 4) * 32 + q * 8 + (nb % 4) * 2 + j, so lane (g, q) accumulates exactly the
// 8 + 8 columns of its two vectors of rows g and g + 8. Every element sees the same mma sequence
// as in add_low_rank_mma_kernel (the same 16-row blocks, experts and k steps), so the results
// are bitwise the same.
constexpr int kStreamThreads = 128;
constexpr int kStreamBlocks = 2;  // mma row blocks per warp tile
constexpr int kStreamTileRows = kStreamBlocks * kTileRows;
constexpr int kStreamTileCols = 64;
constexpr int kStreamVectorCols = 8;  // columns of one 16-byte vector

// Tile column held at mma column `n` of column block nb (the mapping above).
__device__ __forceinline__ int stream_tile_col(int nb, int n) {
  return nb / 4 * 32 + n / 2 * kStreamVectorCols + nb % 4 * 2 + n % 2;
}

template <typename T, bool kPairs>
__global__ void __launch_bounds__(kStreamThreads, 4)
add_low_rank_stream_kernel(T* __restrict__ rows_out, int64_t row_stride, const T* __restrict__ u,
                           int64_t u_stride, const T* __restrict__ mats, const int32_t* __restrict__ row_expert,
                           int64_t rows, int64_t out_dim, int rank, float scale) {
  static_assert(sizeof(T) == 2, "16-bit rows: 8 columns a vector");
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  for_each_warp_tile<kStreamThreads, kStreamTileRows, kStreamTileCols>(rows, out_dim, [&](int64_t row0, int64_t col0,
                                                                                          int n_rows) {
    // This lane's vector in row 16b + g + 8h, column half c (columns c * 32 + q * 8 + [0, 8)); out_dim
    // is a multiple of 8, so a vector is wholly inside or wholly outside.
    T* const lane_base = rows_out + (row0 + g) * row_stride + col0 + q * kStreamVectorCols;
    const auto vector_at = [&](int b, int h, int c, bool& valid) {
      const int r = kTileRows * b + g + 8 * h;
      valid = r < n_rows && col0 + c * 32 + q * kStreamVectorCols < out_dim;
      return reinterpret_cast<uint4*>(lane_base + (kTileRows * b + 8 * h) * row_stride + c * 32);
    };
    uint32_t data[kStreamBlocks][2][2][4];  // [row block b][row g + 8h][column half c][column pair]
#pragma unroll
    for (int b = 0; b < kStreamBlocks; ++b) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          bool valid;
          const uint4* p = vector_at(b, h, c, valid);
          const uint4 v = valid ? __ldcg(p) : make_uint4(0, 0, 0, 0);
          data[b][h][c][0] = v.x, data[b][h][c][1] = v.y, data[b][h][c][2] = v.z, data[b][h][c][3] = v.w;
        }
      }
    }
    // Lane l holds the expert of tile row l, read by the others through shuffles.
    const int32_t my_expert = lane < n_rows ? row_expert[row0 + lane] : -1;
#pragma unroll
    for (int b = 0; b < kStreamBlocks; ++b) {
      const int block_rows = min(kTileRows, n_rows - kTileRows * b);
      if (block_rows <= 0) break;
      const T* u_lo = u + (row0 + kTileRows * b + g) * u_stride;
      const T* u_hi = u_lo + 8 * u_stride;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float acc[4][4] = {};
        for (int first = 0; first < block_rows;) {  // one expert's rows [first, last) of the block at a time
          const int32_t e = __shfl_sync(0xffffffffu, my_expert, kTileRows * b + first);
          const unsigned rows_of_e =
              __ballot_sync(0xffffffffu, my_expert == e) >> (kTileRows * b) & 0xffffu;
          const int last = 32 - __clz(rows_of_e);  // rows are sorted: [first, last) is all of e
          const bool lo_in = g >= first && g < last, hi_in = g + 8 >= first && g + 8 < last;
          const T* m = mats + int64_t{e} * out_dim * rank;
          for (int k0 = 0; k0 < rank; k0 += 16) {
            uint32_t a[4];
            load_u_fragment<T, kPairs>(a, u_lo, u_hi, k0 + 2 * q, rank, lo_in, hi_in);
#pragma unroll
            for (int w = 0; w < 4; ++w) {
              const int64_t col = col0 + stream_tile_col(4 * c + w, g);
              const T* mc = m + col * rank;
              mma_16816<T>(acc[w], a, load_pair<T, kPairs>(mc, k0 + 2 * q, rank, col < out_dim),
                           load_pair<T, kPairs>(mc, k0 + 2 * q + 8, rank, col < out_dim));
            }
          }
          first = last;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const T* old = reinterpret_cast<const T*>(&data[b][h][c][w]);
            data[b][h][c][w] = pack2<T>(fmaf(scale, acc[w][2 * h], to_float(old[0])),
                                        fmaf(scale, acc[w][2 * h + 1], to_float(old[1])));
          }
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          bool valid;
          uint4* p = vector_at(b, h, c, valid);
          if (valid) *p = make_uint4(data[b][h][c][0], data[b][h][c][1], data[b][h][c][2], data[b][h][c][3]);
        }
      }
    }
  });
}

// MOEQUANT_LOW_RANK_KERNEL="0" keeps bf16/fp16 on add_low_rank_mma_kernel (for comparison in
// benchmarks); read once per process.
static bool stream_kernel_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("MOEQUANT_LOW_RANK_KERNEL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// The fp32 version: one thread per element, the rank summed in order.
__global__ void __launch_bounds__(kLowRankThreads)
add_low_rank_fp32_kernel(float* __restrict__ rows_out, int64_t row_stride, const float* __restrict__ u,
                         int64_t u_stride, const float* __restrict__ mats, const int32_t* __restrict__ row_expert,
                         int64_t rows, int64_t out_dim, int rank, float scale) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < rows * out_dim;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / out_dim, col = i % out_dim;
    const float* ur = u + row * u_stride;
    const float* mc = mats + (int64_t{row_expert[row]} * out_dim + col) * rank;
    float acc = 0.0f;
    for (int k = 0; k < rank; ++k) acc = fmaf(ur[k], mc[k], acc);
    rows_out[row * row_stride + col] += scale * acc;
  }
}

void add_low_rank_rows(at::Tensor& rows, const LowRankTerm& term, const ExpertsRouting& r) {
  const int64_t n = rows.size(0), out_dim = rows.size(1), rank = term.u.size(1);
  // Rows need not be packed (torch._grouped_mm pads its output rows to 16-byte multiples).
  TORCH_CHECK(rows.dim() == 2 && rows.stride(1) == 1, "moequant: add_low_rank_rows needs rows of unit column stride");
  TORCH_CHECK(term.u.stride(1) == 1 && term.mats.is_contiguous() && term.u.scalar_type() == rows.scalar_type() &&
                  term.mats.scalar_type() == rows.scalar_type() && term.mats.size(1) == out_dim &&
                  term.mats.size(2) == rank && term.u.size(0) == n,
              "moequant: add_low_rank_rows needs u [R, r] (unit column stride) and mats [E, ", out_dim,
              ", r] (contiguous) in ", rows.scalar_type());
  TORCH_CHECK(rank <= INT32_MAX, "moequant: LoRA rank too large");
  if (n == 0 || out_dim == 0 || rank == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* row_expert = r.sorted_expert.const_data_ptr<int32_t>();
  if (rows.scalar_type() == at::kFloat) {
    add_low_rank_fp32_kernel<<<static_cast<unsigned>(grid_for(n * out_dim, kLowRankThreads)), kLowRankThreads, 0,
                               stream>>>(rows.mutable_data_ptr<float>(), rows.stride(0), term.u.const_data_ptr<float>(),
                                         term.u.stride(0), term.mats.const_data_ptr<float>(), row_expert, n, out_dim,
                                         static_cast<int>(rank), term.scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Factor elements in 4-byte pairs, and rows in whole 16-byte vectors (the streaming kernel).
  const bool factor_pairs = rank % 2 == 0 && term.u.stride(0) % 2 == 0 && is_aligned(term.u.const_data_ptr(), 4) &&
                            is_aligned(term.mats.const_data_ptr(), 4);
  const bool row_vectors = rows.stride(0) % 8 == 0 && out_dim % 8 == 0 && is_aligned(rows.const_data_ptr(), 16);
  const auto launch = [&](auto tag) {
    using T = decltype(tag);
    const auto run = [&](auto kernel, unsigned grid, int threads) {
      kernel<<<grid, threads, 0, stream>>>(
          reinterpret_cast<T*>(rows.mutable_data_ptr()), rows.stride(0),
          reinterpret_cast<const T*>(term.u.const_data_ptr()), term.u.stride(0),
          reinterpret_cast<const T*>(term.mats.const_data_ptr()), row_expert, n, out_dim, static_cast<int>(rank),
          term.scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (row_vectors && stream_kernel_enabled()) {
      const int64_t warp_tiles =
          (n + kStreamTileRows - 1) / kStreamTileRows * ((out_dim + kStreamTileCols - 1) / kStreamTileCols);
      const int64_t ctas = (warp_tiles + kStreamThreads / 32 - 1) / (kStreamThreads / 32);
      const auto stream_kernel =
          factor_pairs ? add_low_rank_stream_kernel<T, true> : add_low_rank_stream_kernel<T, false>;
      run(stream_kernel, static_cast<unsigned>(persistent_grid(stream_kernel, kStreamThreads, ctas)), kStreamThreads);
      return;
    }
    const int64_t warp_tiles = (n + kTileRows - 1) / kTileRows * ((out_dim + kTileCols - 1) / kTileCols);
    const bool pairs = factor_pairs && rows.stride(0) % 2 == 0 && out_dim % 2 == 0 &&
                       is_aligned(rows.const_data_ptr(), 4);
    run(pairs ? add_low_rank_mma_kernel<T, true> : add_low_rank_mma_kernel<T, false>,
        static_cast<unsigned>(grid_for(warp_tiles * 32, kLowRankThreads)), kLowRankThreads);
  };
  if (rows.scalar_type() == at::kBFloat16) {
    launch(__nv_bfloat16{});
  } else {
    TORCH_CHECK(rows.scalar_type() == at::kHalf, "moequant: add_low_rank_rows computes in float32, float16 or bfloat16");
    launch(__half{});
  }
}

}  // namespace moequant
