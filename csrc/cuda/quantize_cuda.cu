// CUDA kernels of quantize_nf4, every format.
//
// 4-bit (NF4, FP4): LANES threads share one block of LANES * CHUNKS * 8 elements: each lane loads
// its 8-element chunks (16-byte loads for 16-bit types), the group reduces absmax with warp
// shuffles, then each lane encodes its chunks and stores 4 packed bytes per chunk. Chunk c of
// lane l starts at element (c * LANES + l) * 8, so loads and stores are coalesced; for 16-bit
// types and blocks up to 512 the next block's chunks are loaded before this one is encoded.
// Encoding uses the exact bin tables of nf4_encode_lut.h (the format's table is a kernel
// parameter) and falls back to the compare encoder of quant_format.h for blocks whose absmax is
// NaN/Inf. The encode is issue-bound, so it is counted in instructions: per element one
// conversion, the scale multiply, the bin fma, one IMAD for the table offset, the table load, a
// compare, a predicated add (NF4) or shift (FP4) and a funnel shift into the packed word (SASS,
// sm_90a: 8.5 per element for both formats, was ~11 for NF4 and ~19 for FP4); 16-bit absmax takes
// one packed max per two elements. H200 (benchmarks/bench_nf4.py, NF4, blocksize 64, the earlier
// encode): 4 lanes x 2 chunks per block reached 75-88% of a same-run copy (FP4 60-66%); 8 x 1
// (512 bytes per warp step) 60-67%, 2 x 4 64-74%, 1 x 8 44-48%.
//
// int8 row-wise: a warp per output row (half a warp for rows up to 1024); the row's chunks stay in
// registers between the absmax reduction and the encode when they fit (rows up to 2048 elements),
// else the encode pass reads the row again (from L2). Rows of finite nonzero absmax encode by one
// multiply and one rounding add per element (no conversion instructions). Rows whose length is
// not a multiple of 8 take an element-wise kernel.
//
// Bit-exact with the CPU kernels: IEEE division and __fmul_rn, no fast math.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <iterator>
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

// The bin tables in shared memory: entry (bin, copy) at byte bin * kBinPitch + copy * 8, lane l
// reading copy l % 16 (cuda_utils.cuh: the 16 lanes of a half-warp hit 16 different bank pairs
// whatever their bins). The pitch is 512 bytes, not 128, so that the byte offset of a bin is the
// fma's bits times 512: the shift drops the exponent and one LEA adds the copy (no mask).
constexpr int kBinPitchShift = 9;
constexpr int kBinTableRows = kFP4Bins;  // the larger of the two tables
static_assert(kNF4Bins <= kBinTableRows && (kLaneTableCopies * kLaneTableEntryBytes) <= (1 << kBinPitchShift));
static_assert(sizeof(NF4Bin) == kLaneTableEntryBytes && sizeof(Quant4CodeBin) == kLaneTableEntryBytes);

// A format's bin table as a kernel parameter: (thr bits, base rank or codes) per bin.
struct BinTableParam {
  uint2 bins[kBinTableRows];
};

template <typename Table>
static BinTableParam bin_table_param(const Table& table) {
  BinTableParam p{};
  for (size_t b = 0; b < std::size(table.bins); ++b) {
    static_assert(sizeof(table.bins[b]) == sizeof(uint2));
    std::memcpy(&p.bins[b], &table.bins[b], sizeof(uint2));
  }
  return p;
}

// Code of x = w * scale when the block's absmax is finite (then |x| <= 1 + 2^-20), with the
// format's bin table (nf4_encode_lut.h): NF4 rounds to the nearest bin and adds the compare to
// the bin's base rank; FP4 rounds up and shifts to the bin's second code when x passes thr.
// Only the low nibble of the result is the code (the caller funnels it into the packed word).
template <QuantType kType>
__device__ __forceinline__ uint32_t encode_finite(float x, const char* table, uint32_t copy_offset) {
  const float f = kType == QuantType::kFP4 ? __fmaf_ru(x, 128.0f, kFP4BinMagic) : __fmaf_rn(x, 128.0f, kNF4BinMagic);
  // f lies in [2^26, 2^27): its bits are the exponent's above bit 22 and the bin below; << 9
  // leaves bin * 512.
  const uint2 e = *reinterpret_cast<const uint2*>(table + ((__float_as_uint(f) << kBinPitchShift) | copy_offset));
  uint32_t code = e.y;
  if constexpr (kType == QuantType::kFP4) {
    asm("{ .reg .pred p; setp.gt.f32 p, %1, %2; @p shr.b32 %0, %0, 4; }"
        : "+r"(code)
        : "f"(x), "f"(__uint_as_float(e.x)));
  } else {
    asm("{ .reg .pred p; setp.gt.f32 p, %1, %2; @p add.u32 %0, %0, 1; }"
        : "+r"(code)
        : "f"(x), "f"(__uint_as_float(e.x)));
  }
  return code;
}

// Element j of a chunk as fp32. bf16 is the top half of an fp32, so a pair's word gives both
// values with one shift and one mask (to_float extracts the half first).
template <typename T>
__device__ __forceinline__ float chunk_float(const Chunk8<T>& c, int j) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t word = reinterpret_cast<const uint32_t*>(c.v)[j / 2];
    return __uint_as_float(j % 2 == 0 ? word << 16 : word & 0xFFFF0000u);
  } else {
    return to_float(c.v[j]);
  }
}

// Packs the codes of one chunk into a little-endian word: element 2i in the high nibble of byte
// i. Each code enters at the top of the word by a funnel shift that drops everything above its
// nibble, so the codes are inserted in nibble order 1, 0, 3, 2, ... and need no mask.
template <bool kFinite, QuantType kType, typename T>
__device__ __forceinline__ uint32_t encode_chunk(const Chunk8<T>& c, float scale, const char* table,
                                                 uint32_t copy_offset) {
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const float x = __fmul_rn(chunk_float(c, 2 * i + 1 - k), scale);
      const uint32_t code = kFinite ? encode_finite<kType>(x, table, copy_offset) : quant4_encode(kType, x);
      word = __funnelshift_r(word, code, 4);
    }
  }
  return word;
}

// Running max |x| over a chunk, NaN-propagating like absmax_nan. 16-bit types compare pairs in
// their own format (|x| and max are exact there, so the maximum is the same value): one max per
// two elements instead of a conversion and a max per element.
template <typename T>
struct ChunkAbsmax {
  float amax = 0.0f;
  __device__ __forceinline__ void add(const Chunk8<float>& c) {
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = absmax_nan(amax, c.v[i]);
  }
  __device__ __forceinline__ float result() const { return amax; }
};
template <typename T>
  requires(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>)
struct ChunkAbsmax<T> {
  using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  Pair amax = zero();
  static __device__ __forceinline__ Pair zero() {
    if constexpr (std::is_same_v<T, __half>) return __float2half2_rn(0.0f);
    else return __float2bfloat162_rn(0.0f);
  }
  __device__ __forceinline__ void add(const Chunk8<T>& c) {
    const Pair* p = reinterpret_cast<const Pair*>(c.v);
#pragma unroll
    for (int i = 0; i < 4; ++i) amax = __hmax2_nan(amax, __habs2(p[i]));
  }
  // As fp32, through absmax_nan so that a NaN comes out as the fp32 canonical NaN, as before.
  __device__ __forceinline__ float result() const {
    return absmax_nan(absmax_nan(0.0f, to_float(amax.x)), to_float(amax.y));
  }
};

// BATCH chunks per lane are held in registers at a time. With BATCH == CHUNKS the block is read
// once (and, for small chunk sets, the next block's chunks are loaded before this one is
// encoded: two blocks in flight per lane); larger blocks (2048, 4096) take two passes, the second
// reading the block again (mostly from L1/L2), instead of holding up to 128 values per thread.
template <typename T, int LANES, int CHUNKS, int BATCH, QuantType kType>
__global__ void __launch_bounds__(kQuantizeThreads)
quantize_4bit_kernel(const T* __restrict__ weight, uint8_t* __restrict__ packed, float* __restrict__ absmax,
                     int64_t num_blocks, const __grid_constant__ BinTableParam bins) {
  static_assert(32 % LANES == 0 && CHUNKS % BATCH == 0);
  constexpr int kGroupsPerWarp = 32 / LANES;
  constexpr int64_t kBlock = int64_t{LANES} * CHUNKS * 8;
  constexpr bool kOnePass = BATCH == CHUNKS;
  // The next block is loaded while this one is encoded where that costs at most 8 registers (16-bit
  // types, up to 2 chunks per lane); larger chunk sets would cut occupancy more than it gains.
  constexpr bool kPrefetch = kOnePass && sizeof(Chunk8<T>) * CHUNKS <= 32;

  __shared__ uint2 bin_table[kBinTableRows << kBinPitchShift >> 3];
  for (int i = threadIdx.x; i < kBinTableRows * kLaneTableCopies; i += blockDim.x) {
    const int bin = i / kLaneTableCopies, copy = i % kLaneTableCopies;
    bin_table[(bin << kBinPitchShift >> 3) + copy] = bins.bins[bin];
  }
  __syncthreads();
  const char* table = reinterpret_cast<const char*>(bin_table);
  const uint32_t copy_offset = lane_table_copy_offset();

  const int lane = threadIdx.x % LANES;
  const int group = (threadIdx.x % 32) / LANES;
  const int64_t warp = (int64_t{blockIdx.x} * kQuantizeThreads + threadIdx.x) / 32;
  const int64_t num_warps = int64_t{gridDim.x} * (kQuantizeThreads / 32);
  const int64_t stride = num_warps * kGroupsPerWarp;
  // Groups past the end load the last block (and store nothing): no predicated loads.
  auto block_weight = [&](int64_t b) { return weight + min(b, num_blocks - 1) * kBlock + lane * 8; };

  Chunk8<T> x[BATCH];
  if constexpr (kPrefetch) {
#pragma unroll
    for (int c = 0; c < BATCH; ++c) x[c] = load_chunk(block_weight(warp * kGroupsPerWarp + group) + c * (LANES * 8));
  }
  // Warp-uniform loop, so every lane takes part in the shuffles; inactive groups idle.
  for (int64_t first = warp * kGroupsPerWarp; first < num_blocks; first += stride) {
    const int64_t b = first + group;
    const bool active = b < num_blocks;
    const T* w = block_weight(b);
    uint32_t* out = reinterpret_cast<uint32_t*>(packed + b * (kBlock / 2)) + lane;

    ChunkAbsmax<T> reduce;
    Chunk8<T> cur[BATCH];
    if constexpr (kPrefetch) {
#pragma unroll
      for (int c = 0; c < BATCH; ++c) {
        reduce.add(x[c]);
        cur[c] = x[c];
        x[c] = load_chunk(block_weight(b + stride) + c * (LANES * 8));  // the next block, in flight
      }
    } else if constexpr (kOnePass) {
#pragma unroll
      for (int c = 0; c < BATCH; ++c) cur[c] = load_chunk(w + c * (LANES * 8));
#pragma unroll
      for (int c = 0; c < BATCH; ++c) reduce.add(cur[c]);
    } else {
#pragma unroll 1  // keeps one batch of loads live at a time
      for (int c0 = 0; c0 < CHUNKS; c0 += BATCH) {
#pragma unroll
        for (int c = 0; c < BATCH; ++c) x[c] = load_chunk(w + (c0 + c) * (LANES * 8));
#pragma unroll
        for (int c = 0; c < BATCH; ++c) reduce.add(x[c]);
      }
    }
    float amax = reduce.result();
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
        for (int c = 0; c < BATCH; ++c) cur[c] = load_chunk(w + (c0 + c) * (LANES * 8));
      }
#pragma unroll
      for (int c = 0; c < BATCH; ++c) {
        out[(c0 + c) * LANES] = finite ? encode_chunk<true, kType>(cur[c], scale, table, copy_offset)
                                       : encode_chunk<false, kType>(cur[c], scale, table, copy_offset);
      }
    }
  }
}

template <typename T, int LANES, int CHUNKS, int BATCH = CHUNKS>
static void launch_quantize_4bit(const T* w, uint8_t* p, float* a, int64_t num_blocks, QuantType type) {
  constexpr int kBlocksPerCta = kQuantizeThreads / LANES;
  const BinTableParam bins =
      type == QuantType::kFP4 ? bin_table_param(kFP4CodeBinTable) : bin_table_param(kNF4BinTable);
  auto go = [&](auto kernel) {
    const int64_t grid =
        persistent_grid(kernel, kQuantizeThreads, (num_blocks + kBlocksPerCta - 1) / kBlocksPerCta);
    kernel<<<grid, kQuantizeThreads, 0, at::cuda::getCurrentCUDAStream()>>>(w, p, a, num_blocks, bins);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (type == QuantType::kFP4) go(quantize_4bit_kernel<T, LANES, CHUNKS, BATCH, QuantType::kFP4>);
  else go(quantize_4bit_kernel<T, LANES, CHUNKS, BATCH, QuantType::kNF4>);
}

template <typename T>
static void quantize_4bit(const T* wp, uint8_t* pp, float* ap, int64_t num_blocks, int64_t blocksize,
                          QuantType type) {
  switch (blocksize) {
    case 32: launch_quantize_4bit<T, 2, 2>(wp, pp, ap, num_blocks, type); break;
    case 64: launch_quantize_4bit<T, 4, 2>(wp, pp, ap, num_blocks, type); break;
    case 128: launch_quantize_4bit<T, 8, 2>(wp, pp, ap, num_blocks, type); break;
    case 256: launch_quantize_4bit<T, 16, 2>(wp, pp, ap, num_blocks, type); break;
    case 512: launch_quantize_4bit<T, 32, 2>(wp, pp, ap, num_blocks, type); break;
    case 1024: launch_quantize_4bit<T, 32, 4>(wp, pp, ap, num_blocks, type); break;
    case 2048: launch_quantize_4bit<T, 32, 8, 4>(wp, pp, ap, num_blocks, type); break;
    case 4096: launch_quantize_4bit<T, 32, 16, 4>(wp, pp, ap, num_blocks, type); break;
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

// The same codes by one add per element, for rows whose absmax is finite and nonzero and whose
// multiplier is finite (then every |w * multiplier| <= 127 * (1 + 2^-23) and no value is NaN):
// fp32(y + 1.5 * 2^23) lies in [2^23, 2^24), where the ulp is 1, so it is 1.5 * 2^23 + rint(y)
// (ties to even, as rintf), and its low byte is the int8 code. Then three byte permutes per
// four codes. No conversion instructions (F2I, FRND), which run at a quarter of the issue rate.
template <typename T>
__device__ __forceinline__ uint2 encode_int8_chunk_finite(const Chunk8<T>& c, float multiplier) {
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
  uint32_t t[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) t[i] = __float_as_uint(__fadd_rn(__fmul_rn(chunk_float(c, i), multiplier), kRoundMagic));
  uint32_t word[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t lo = __byte_perm(t[4 * h], t[4 * h + 1], 0x0040);  // codes 4h, 4h + 1 in bytes 0, 1
    const uint32_t hi = __byte_perm(t[4 * h + 2], t[4 * h + 3], 0x0040);
    word[h] = __byte_perm(lo, hi, 0x5410);
  }
  return make_uint2(word[0], word[1]);
}

// One 8-element chunk, or zeros where `valid` is false (loaded as words: no per-element selects).
template <typename T>
__device__ __forceinline__ Chunk8<T> load_chunk_or_zero(const T* p, bool valid) {
  Chunk8<T> c;
  constexpr int kVecs = sizeof(Chunk8<T>) / 16;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    reinterpret_cast<uint4*>(&c)[i] = valid ? reinterpret_cast<const uint4*>(p)[i] : make_uint4(0, 0, 0, 0);
  }
  return c;
}

// LANES threads per row (a warp holds 32 / LANES rows; grid-stride over rows); cols is a multiple
// of 8 and rows start 16-byte aligned. Short rows take half a warp each, so that a warp keeps as
// many loads in flight as with long rows (H200, qwen3 down rows of 768: 57% of copy with 32 lanes).
// 16-bit rows fit in 64 registers (4 CTAs, 32 warps per SM; unbounded they took 99 and ran 2
// CTAs); fp32 chunks are twice the registers.
template <typename T, int LANES>
__global__ void __launch_bounds__(kQuantizeThreads, sizeof(T) == 2 ? 4 : 2)
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
    // Groups past the end read the last row (and store nothing).
    const T* w = weight + min(row, num_rows - 1) * cols;
    uint2* out = reinterpret_cast<uint2*>(codes + row * cols);
    Chunk8<T> x[kInt8RowChunks];
    ChunkAbsmax<T> reduce;
    for (int64_t c0 = 0; c0 < row_chunks; c0 += LANES * kInt8RowChunks) {
#pragma unroll
      for (int c = 0; c < kInt8RowChunks; ++c) {
        const int64_t ch = c0 + c * LANES + lane;
        x[c] = load_chunk_or_zero(w + ch * 8, ch < row_chunks);
      }
#pragma unroll
      for (int c = 0; c < kInt8RowChunks; ++c) reduce.add(x[c]);
    }
    float amax = reduce.result();
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) {
      amax = absmax_nan(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    if (!active) continue;
    if (lane == 0) row_absmax[row] = amax;
    const float multiplier = int8_row_multiplier(amax);
    const bool finite = amax > 0.0f && isfinite(amax) && isfinite(multiplier);  // uniform across the row
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
        if (ch < row_chunks) {
          out[ch] = finite ? encode_int8_chunk_finite(x[c], multiplier) : encode_int8_chunk(x[c], multiplier);
        }
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
