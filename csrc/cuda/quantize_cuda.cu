// CUDA kernels of quantize_nf4, every format.
//
// 4-bit (NF4, FP4): LANES threads share one block of LANES * CHUNKS * 8 elements: each lane loads
// its 8-element chunks (16-byte loads for 16-bit types), the group reduces absmax with warp
// shuffles, then each lane encodes its chunks and stores 4 packed bytes per chunk. Chunk c of
// lane l starts at element (c * LANES + l) * 8, so loads and stores are coalesced. Encoding uses
// the exact bin table of nf4_encode_lut.h (the format's table is a kernel parameter; FP4 adds
// two compares and its rank -> code map) and falls back to the compare encoder of
// quant_format.h for blocks whose absmax is NaN/Inf. H200 (benchmarks/bench_nf4.py, NF4,
// blocksize 64): 4 lanes x 2 chunks per block reached 75-88% of a same-run copy; 8 x 1 (512
// bytes per warp step) 60-67%, 2 x 4 64-74%, 1 x 8 44-48%.
//
// int8 row-wise: a warp per output row (half a warp for rows up to 1024); the row's chunks stay in
// registers between the absmax reduction and the encode when they fit (rows up to 2048 elements),
// else the encode pass reads the row again (from L2). Rows whose length is not a multiple of 8
// take an element-wise kernel.
//
// Bit-exact with the CPU kernels: IEEE division and __fmul_rn, no fast math.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "../kernels.h"
#include "../quant_checks.h"
#include "cuda_utils.cuh"
#include "nf4_encode_lut.h"

// fp32, fp16, bf16 only (the checks reject other dtypes; no dead double kernels).
#define MOEQUANT_DISPATCH_QUANTIZE_TYPES(TYPE, NAME, ...)                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)           \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace moequant {

constexpr int kQuantizeThreads = 256;

template <typename T>
struct alignas(16) Chunk8 {
  T v[8];
};

// One 8-element chunk: one 16-byte load, or two for fp32.
template <typename T>
__device__ __forceinline__ Chunk8<T> load_chunk(const T* p) {
  Chunk8<T> c;
  constexpr int kVecs = sizeof(Chunk8<T>) / 16;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) reinterpret_cast<uint4*>(&c)[i] = reinterpret_cast<const uint4*>(p)[i];
  return c;
}

// max(m, |x|) that propagates NaN like torch.max (and nf4_absmax_step), in one instruction.
__device__ __forceinline__ float absmax_nan(float m, float x) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(m), "f"(fabsf(x)));
  return r;
}

// ---- 4-bit -------------------------------------------------------------------------------

// A 4-bit format's fast encoder as data: its bin table and the FP4 extras (nf4_encode_lut.h).
struct Quant4Encoder {
  NF4BinTable table;
  Quant4EncodeExtras extras;
  QuantType type;
};

// Where a lane reads the bin table: the table (warp-uniform; kLaneTableCopies lane-interleaved
// copies in shared memory, cuda_utils.cuh, since with one copy bins b and b + 16, x near -0.5 and
// +0.5, collide) and the lane's copy offset in bytes.
struct BinTableView {
  const char* table;
  uint32_t copy_offset;
};

// Exact code of x = w * scale when the block's absmax is finite (then |x| <= 1 + 2^-20).
// kExtras: the format counts two midpoints by compares and maps ranks to codes (FP4).
template <bool kExtras>
__device__ __forceinline__ uint32_t encode_finite(float x, BinTableView bins, const Quant4EncodeExtras& extras) {
  // Byte offset bin * 128 | copy offset: one shift and one LOP3.
  const uint32_t offset =
      lane_table_offset<63u << 7>(__float_as_uint(__fmaf_rn(x, 128.0f, kNF4BinMagic)) << 7, bins.copy_offset);
  const NF4Bin e = *reinterpret_cast<const NF4Bin*>(bins.table + offset);
  const uint32_t rank = e.base + (x > e.thr ? 1u : 0u);
  if constexpr (kExtras) {
    const uint32_t r = rank + (x > extras.extra_low ? 1u : 0u) + (x > extras.extra_high ? 1u : 0u);
    return static_cast<uint32_t>(extras.code_of_rank >> (4 * r)) & 0xFu;
  } else {
    return rank;
  }
}

// Packs the codes of one chunk into a little-endian word: element 2i in the high nibble of byte i.
template <bool kFinite, bool kExtras, typename T>
__device__ __forceinline__ uint32_t encode_chunk(const Chunk8<T>& c, float scale, BinTableView bins,
                                                 const Quant4EncodeExtras& extras, QuantType type) {
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float a = __fmul_rn(to_float(c.v[2 * i]), scale), b = __fmul_rn(to_float(c.v[2 * i + 1]), scale);
    const uint32_t hi = kFinite ? encode_finite<kExtras>(a, bins, extras) : quant4_encode(type, a);
    const uint32_t lo = kFinite ? encode_finite<kExtras>(b, bins, extras) : quant4_encode(type, b);
    word |= ((hi << 4) | lo) << (8 * i);
  }
  return word;
}

// BATCH chunks per lane are held in registers at a time. With BATCH == CHUNKS the block is read
// once; larger blocks (2048, 4096) take two passes, the second reading the block again (mostly
// from L1/L2), instead of holding up to 128 values per thread.
template <typename T, int LANES, int CHUNKS, int BATCH, bool kExtras>
__global__ void __launch_bounds__(kQuantizeThreads)
quantize_4bit_kernel(const T* __restrict__ weight, uint8_t* __restrict__ packed, float* __restrict__ absmax,
                     int64_t num_blocks, const __grid_constant__ Quant4Encoder encoder) {
  static_assert(sizeof(NF4Bin) == kLaneTableEntryBytes, "encode_finite shifts bins by 7 bits");
  static_assert(32 % LANES == 0 && CHUNKS % BATCH == 0);
  constexpr int kGroupsPerWarp = 32 / LANES;
  constexpr int64_t kBlock = int64_t{LANES} * CHUNKS * 8;
  constexpr bool kOnePass = BATCH == CHUNKS;

  __shared__ NF4Bin bin_table[kNF4Bins * kLaneTableCopies];
  for (int i = threadIdx.x; i < kNF4Bins * kLaneTableCopies; i += blockDim.x) {
    bin_table[i] = encoder.table.bins[i / kLaneTableCopies];
  }
  __syncthreads();
  const BinTableView bins{reinterpret_cast<const char*>(bin_table), lane_table_copy_offset()};

  const int lane = threadIdx.x % LANES;
  const int group = (threadIdx.x % 32) / LANES;
  const int64_t warp = (int64_t{blockIdx.x} * kQuantizeThreads + threadIdx.x) / 32;
  const int64_t num_warps = int64_t{gridDim.x} * (kQuantizeThreads / 32);

  // Warp-uniform loop, so every lane takes part in the shuffles; inactive groups idle.
  for (int64_t first = warp * kGroupsPerWarp; first < num_blocks; first += num_warps * kGroupsPerWarp) {
    const int64_t b = first + group;
    const bool active = b < num_blocks;
    const T* w = weight + b * kBlock + lane * 8;
    uint32_t* out = reinterpret_cast<uint32_t*>(packed + b * (kBlock / 2)) + lane;

    Chunk8<T> x[BATCH];
    float amax = 0.0f;
#pragma unroll 1  // keeps one batch of loads live at a time
    for (int c0 = 0; c0 < CHUNKS; c0 += BATCH) {
#pragma unroll
      for (int c = 0; c < BATCH; ++c) {
        if (active) x[c] = load_chunk(w + (c0 + c) * (LANES * 8));
        else x[c] = Chunk8<T>{};
      }
#pragma unroll
      for (int c = 0; c < BATCH; ++c) {
#pragma unroll
        for (int i = 0; i < 8; ++i) amax = absmax_nan(amax, to_float(x[c].v[i]));
      }
    }
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) {
      amax = absmax_nan(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    if (!active) continue;
    if (lane == 0) absmax[b] = amax;
    const float scale = nf4_block_scale(amax);
    const bool finite = isfinite(amax);  // uniform across the group
#pragma unroll 1
    for (int c0 = 0; c0 < CHUNKS; c0 += BATCH) {
      if constexpr (!kOnePass) {
#pragma unroll
        for (int c = 0; c < BATCH; ++c) x[c] = load_chunk(w + (c0 + c) * (LANES * 8));
      }
#pragma unroll
      for (int c = 0; c < BATCH; ++c) {
        out[(c0 + c) * LANES] = finite ? encode_chunk<true, kExtras>(x[c], scale, bins, encoder.extras, encoder.type)
                                       : encode_chunk<false, kExtras>(x[c], scale, bins, encoder.extras, encoder.type);
      }
    }
  }
}

template <typename T, int LANES, int CHUNKS, int BATCH = CHUNKS>
static void launch_quantize_4bit(const T* w, uint8_t* p, float* a, int64_t num_blocks, const Quant4Encoder& enc) {
  constexpr int kBlocksPerCta = kQuantizeThreads / LANES;
  auto go = [&](auto kernel) {
    const int64_t grid =
        persistent_grid(kernel, kQuantizeThreads, (num_blocks + kBlocksPerCta - 1) / kBlocksPerCta);
    kernel<<<grid, kQuantizeThreads, 0, at::cuda::getCurrentCUDAStream()>>>(w, p, a, num_blocks, enc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (enc.type == QuantType::kFP4) go(quantize_4bit_kernel<T, LANES, CHUNKS, BATCH, true>);
  else go(quantize_4bit_kernel<T, LANES, CHUNKS, BATCH, false>);
}

template <typename T>
static void quantize_4bit(const T* wp, uint8_t* pp, float* ap, int64_t num_blocks, int64_t blocksize,
                          QuantType type) {
  const Quant4Encoder enc{type == QuantType::kFP4 ? kFP4BinTable : kNF4BinTable,
                          type == QuantType::kFP4 ? kFP4EncodeExtras : kNF4EncodeExtras, type};
  switch (blocksize) {
    case 32: launch_quantize_4bit<T, 2, 2>(wp, pp, ap, num_blocks, enc); break;
    case 64: launch_quantize_4bit<T, 4, 2>(wp, pp, ap, num_blocks, enc); break;
    case 128: launch_quantize_4bit<T, 8, 2>(wp, pp, ap, num_blocks, enc); break;
    case 256: launch_quantize_4bit<T, 16, 2>(wp, pp, ap, num_blocks, enc); break;
    case 512: launch_quantize_4bit<T, 32, 2>(wp, pp, ap, num_blocks, enc); break;
    case 1024: launch_quantize_4bit<T, 32, 4>(wp, pp, ap, num_blocks, enc); break;
    case 2048: launch_quantize_4bit<T, 32, 8, 4>(wp, pp, ap, num_blocks, enc); break;
    case 4096: launch_quantize_4bit<T, 32, 16, 4>(wp, pp, ap, num_blocks, enc); break;
    default: TORCH_CHECK(false, "moequant.quantize_nf4: unsupported blocksize ", blocksize);
  }
}

// ---- int8 row-wise -------------------------------------------------------------------------

constexpr int kInt8RowChunks = 8;  // 8-element chunks per lane held in registers

// The int8 codes of one chunk, little-endian, element 0 in the low byte.
template <typename T>
__device__ __forceinline__ uint2 encode_int8_chunk(const Chunk8<T>& c, float multiplier) {
  uint32_t word[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t q = static_cast<uint8_t>(int8_encode(to_float(c.v[i]), multiplier));
    word[i / 4] |= q << (8 * (i % 4));
  }
  return make_uint2(word[0], word[1]);
}

// LANES threads per row (a warp holds 32 / LANES rows; grid-stride over rows); cols is a multiple
// of 8 and rows start 16-byte aligned. Short rows take half a warp each, so that a warp keeps as
// many loads in flight as with long rows (H200, qwen3 down rows of 768: 57% of copy with 32 lanes).
template <typename T, int LANES>
__global__ void __launch_bounds__(kQuantizeThreads)
quantize_int8_rows_kernel(const T* __restrict__ weight, int8_t* __restrict__ codes, float* __restrict__ row_absmax,
                          int64_t num_rows, int64_t cols) {
  constexpr int kRowsPerWarp = 32 / LANES;
  const int lane = threadIdx.x % LANES;
  const int group = (threadIdx.x % 32) / LANES;
  const int64_t warp = (int64_t{blockIdx.x} * kQuantizeThreads + threadIdx.x) / 32;
  const int64_t num_warps = int64_t{gridDim.x} * (kQuantizeThreads / 32);
  const int64_t row_chunks = cols / 8;
  const bool in_registers = row_chunks <= LANES * kInt8RowChunks;
  // Warp-uniform loop, so every lane takes part in the shuffles; inactive groups idle.
  for (int64_t first = warp * kRowsPerWarp; first < num_rows; first += num_warps * kRowsPerWarp) {
    const int64_t row = first + group;
    const bool active = row < num_rows;
    const T* w = weight + row * cols;
    uint2* out = reinterpret_cast<uint2*>(codes + row * cols);
    Chunk8<T> x[kInt8RowChunks];
    float amax = 0.0f;
    for (int64_t c0 = 0; c0 < row_chunks; c0 += LANES * kInt8RowChunks) {
#pragma unroll
      for (int c = 0; c < kInt8RowChunks; ++c) {
        const int64_t ch = c0 + c * LANES + lane;
        x[c] = active && ch < row_chunks ? load_chunk(w + ch * 8) : Chunk8<T>{};
      }
#pragma unroll
      for (int c = 0; c < kInt8RowChunks; ++c) {
#pragma unroll
        for (int i = 0; i < 8; ++i) amax = absmax_nan(amax, to_float(x[c].v[i]));
      }
    }
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) {
      amax = absmax_nan(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    if (!active) continue;
    if (lane == 0) row_absmax[row] = amax;
    const float multiplier = int8_row_multiplier(amax);
    for (int64_t c0 = 0; c0 < row_chunks; c0 += LANES * kInt8RowChunks) {
      if (!in_registers) {
#pragma unroll
        for (int c = 0; c < kInt8RowChunks; ++c) {
          const int64_t ch = c0 + c * LANES + lane;
          if (ch < row_chunks) x[c] = load_chunk(w + ch * 8);
        }
      }
#pragma unroll
      for (int c = 0; c < kInt8RowChunks; ++c) {
        const int64_t ch = c0 + c * LANES + lane;
        if (ch < row_chunks) out[ch] = encode_int8_chunk(x[c], multiplier);
      }
    }
  }
}

// Rows of any length: one warp per row, one element per lane step.
template <typename T>
__global__ void __launch_bounds__(kQuantizeThreads)
quantize_int8_rows_elementwise_kernel(const T* __restrict__ weight, int8_t* __restrict__ codes,
                                      float* __restrict__ row_absmax, int64_t num_rows, int64_t cols) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t{blockIdx.x} * kQuantizeThreads + threadIdx.x) / 32;
  const int64_t num_warps = int64_t{gridDim.x} * (kQuantizeThreads / 32);
  for (int64_t row = warp; row < num_rows; row += num_warps) {
    const T* w = weight + row * cols;
    float amax = 0.0f;
    for (int64_t i = lane; i < cols; i += 32) amax = absmax_nan(amax, to_float(w[i]));
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) amax = absmax_nan(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    if (lane == 0) row_absmax[row] = amax;
    const float multiplier = int8_row_multiplier(amax);
    for (int64_t i = lane; i < cols; i += 32) codes[row * cols + i] = int8_encode(to_float(w[i]), multiplier);
  }
}

template <typename T>
static void quantize_int8(const T* wp, int8_t* cp, float* ap, int64_t num_rows, int64_t cols) {
  constexpr int kRowsPerCta = kQuantizeThreads / 32;
  const int64_t ctas = (num_rows + kRowsPerCta - 1) / kRowsPerCta;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (cols % 8 == 0 && is_aligned(cp, 16)) {
    auto go = [&](auto kernel) {
      const int64_t grid = persistent_grid(kernel, kQuantizeThreads, ctas);
      kernel<<<grid, kQuantizeThreads, 0, stream>>>(wp, cp, ap, num_rows, cols);
    };
    if (cols / 8 <= 16 * kInt8RowChunks) go(quantize_int8_rows_kernel<T, 16>);  // rows up to 1024
    else go(quantize_int8_rows_kernel<T, 32>);
  } else {
    const int64_t grid = persistent_grid(quantize_int8_rows_elementwise_kernel<T>, kQuantizeThreads, ctas);
    quantize_int8_rows_elementwise_kernel<T><<<grid, kQuantizeThreads, 0, stream>>>(wp, cp, ap, num_rows, cols);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& weight, int64_t blocksize,
                                                     c10::string_view quant_type) {
  const QuantType type = parse_quant_type(quant_type);
  const StackShape shape = check_quantize_args(weight, blocksize, type);
  TORCH_CHECK(weight.is_cuda(), "moequant.quantize_nf4 (CUDA kernel): weight must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = contiguous_aligned16(weight);
  at::Tensor packed = at::empty_symint(shape.packed_sizes(), w.options().dtype(shape.packed_dtype()));
  at::Tensor absmax = at::empty_symint(shape.absmax_sizes(blocksize), w.options().dtype(at::kFloat));
  const int64_t numel = shape.numel().expect_int();
  if (numel == 0) return {packed, absmax};
  MOEQUANT_DISPATCH_QUANTIZE_TYPES(w.scalar_type(), "quantize_nf4_cuda", [&] {
    using T = typename native<scalar_t>::type;
    const T* wp = reinterpret_cast<const T*>(w.const_data_ptr<scalar_t>());
    float* ap = absmax.mutable_data_ptr<float>();
    if (is_4bit(type)) {
      quantize_4bit<T>(wp, packed.mutable_data_ptr<uint8_t>(), ap, numel / blocksize, blocksize, type);
    } else {
      const int64_t cols = shape.cols.expect_int();
      quantize_int8<T>(wp, packed.mutable_data_ptr<int8_t>(), ap, numel / cols, cols);
    }
  });
  return {packed, absmax};
}

}  // namespace moequant
