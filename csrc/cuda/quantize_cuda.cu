// CUDA kernel of quantize_nf4. LANES threads share one NF4 block of LANES * CHUNKS * 8 elements:
// each lane loads its 8-element chunks (16-byte loads for 16-bit types), the group reduces absmax
// with warp shuffles, then each lane encodes its chunks and stores 4 packed bytes per chunk.
// Chunk c of lane l starts at element (c * LANES + l) * 8, so loads and stores are coalesced.
// Encoding uses the exact bin table of nf4_encode_lut.h (the 15-compare nf4_encode made the
// kernel issue-bound) and falls back to nf4_encode for blocks whose absmax is NaN/Inf.
// Bit-exact with the CPU kernel: IEEE division for the scale and __fmul_rn, no fast math.
// H200 (benchmarks/bench_nf4.py, blocksize 64): 4 lanes x 2 chunks per block reached 75-88% of a
// same-run copy; 8 x 1 (512 bytes per warp step) 60-67%, 2 x 4 64-74%, 1 x 8 44-48%.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "../kernels.h"
#include "../quant_checks.h"
#include "../nf4_format.h"
#include "cuda_utils.cuh"
#include "nf4_encode_lut.h"

// fp32, fp16, bf16 only (the checks reject other dtypes; no dead double kernels).
#define MOEQUANT_DISPATCH_NF4_TYPES(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)           \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace moequant {

constexpr int kQuantizeThreads = 256;

__device__ __constant__ NF4BinTable kNF4BinTableDevice = kNF4BinTable;

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

// Where a lane reads the bin table: the table (warp-uniform; kLaneTableCopies lane-interleaved
// copies in shared memory, cuda_utils.cuh, since with one copy bins b and b + 16, x near -0.5 and
// +0.5, collide) and the lane's copy offset in bytes.
struct BinTableView {
  const char* table;
  uint32_t copy_offset;
};

// Exact code of x = w * scale when the block's absmax is finite (then |x| <= 1 + 2^-20).
__device__ __forceinline__ uint32_t encode_finite(float x, BinTableView bins) {
  // Byte offset bin * 128 | copy offset: one shift and one LOP3.
  const uint32_t offset =
      lane_table_offset<63u << 7>(__float_as_uint(__fmaf_rn(x, 128.0f, kNF4BinMagic)) << 7, bins.copy_offset);
  const NF4Bin e = *reinterpret_cast<const NF4Bin*>(bins.table + offset);
  return e.base + (x > e.thr ? 1u : 0u);
}

template <bool kFinite>
__device__ __forceinline__ uint32_t encode(float x, BinTableView bins) {
  if constexpr (kFinite) return encode_finite(x, bins);
  else return nf4_encode(x);
}

// Packs the codes of one chunk into a little-endian word: element 2i in the high nibble of byte i.
template <bool kFinite, typename T>
__device__ __forceinline__ uint32_t encode_chunk(const Chunk8<T>& c, float scale, BinTableView bins) {
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t hi = encode<kFinite>(__fmul_rn(to_float(c.v[2 * i]), scale), bins);
    const uint32_t lo = encode<kFinite>(__fmul_rn(to_float(c.v[2 * i + 1]), scale), bins);
    word |= ((hi << 4) | lo) << (8 * i);
  }
  return word;
}

// BATCH chunks per lane are held in registers at a time. With BATCH == CHUNKS the block is read
// once; larger blocks (2048, 4096) take two passes, the second reading the block again (mostly
// from L1/L2), instead of holding up to 128 values per thread.
template <typename T, int LANES, int CHUNKS, int BATCH>
__global__ void __launch_bounds__(kQuantizeThreads)
quantize_nf4_kernel(const T* __restrict__ weight, uint8_t* __restrict__ packed,
                    float* __restrict__ absmax, int64_t num_blocks) {
  static_assert(sizeof(NF4Bin) == kLaneTableEntryBytes, "encode_finite shifts bins by 7 bits");
  static_assert(32 % LANES == 0 && CHUNKS % BATCH == 0);
  constexpr int kGroupsPerWarp = 32 / LANES;
  constexpr int64_t kBlock = int64_t{LANES} * CHUNKS * 8;
  constexpr bool kOnePass = BATCH == CHUNKS;

  __shared__ NF4Bin bin_table[kNF4Bins * kLaneTableCopies];
  for (int i = threadIdx.x; i < kNF4Bins * kLaneTableCopies; i += blockDim.x) {
    bin_table[i] = kNF4BinTableDevice.bins[i / kLaneTableCopies];
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
        out[(c0 + c) * LANES] = finite ? encode_chunk<true>(x[c], scale, bins)
                                       : encode_chunk<false>(x[c], scale, bins);
      }
    }
  }
}

template <typename T, int LANES, int CHUNKS, int BATCH = CHUNKS>
static void launch_quantize(const T* w, uint8_t* p, float* a, int64_t num_blocks) {
  constexpr int kBlocksPerCta = kQuantizeThreads / LANES;
  auto kernel = quantize_nf4_kernel<T, LANES, CHUNKS, BATCH>;
  const int64_t grid = persistent_grid(kernel, kQuantizeThreads, (num_blocks + kBlocksPerCta - 1) / kBlocksPerCta);
  kernel<<<grid, kQuantizeThreads, 0, at::cuda::getCurrentCUDAStream()>>>(w, p, a, num_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& weight, int64_t blocksize,
                                                     c10::string_view quant_type) {
  const QuantType type = parse_quant_type(quant_type);
  const StackShape shape = check_quantize_args(weight, blocksize, type);
  TORCH_CHECK(type == QuantType::kNF4, "moequant.quantize_nf4: quant_type=\"", std::string(quant_type),
              "\" is not implemented on CUDA yet");
  TORCH_CHECK(weight.is_cuda(), "moequant.quantize_nf4 (CUDA kernel): weight must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = contiguous_aligned16(weight);
  at::Tensor packed = at::empty_symint(shape.packed_sizes(), w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty_symint(shape.absmax_sizes(blocksize), w.options().dtype(at::kFloat));
  const int64_t num_blocks = shape.numel().expect_int() / blocksize;
  if (num_blocks == 0) return {packed, absmax};
  MOEQUANT_DISPATCH_NF4_TYPES(w.scalar_type(), "quantize_nf4_cuda", [&] {
    using T = typename native<scalar_t>::type;
    const T* wp = reinterpret_cast<const T*>(w.const_data_ptr<scalar_t>());
    uint8_t* pp = packed.mutable_data_ptr<uint8_t>();
    float* ap = absmax.mutable_data_ptr<float>();
    switch (blocksize) {
      case 32: launch_quantize<T, 2, 2>(wp, pp, ap, num_blocks); break;
      case 64: launch_quantize<T, 4, 2>(wp, pp, ap, num_blocks); break;
      case 128: launch_quantize<T, 8, 2>(wp, pp, ap, num_blocks); break;
      case 256: launch_quantize<T, 16, 2>(wp, pp, ap, num_blocks); break;
      case 512: launch_quantize<T, 32, 2>(wp, pp, ap, num_blocks); break;
      case 1024: launch_quantize<T, 32, 4>(wp, pp, ap, num_blocks); break;
      case 2048: launch_quantize<T, 32, 8, 4>(wp, pp, ap, num_blocks); break;
      case 4096: launch_quantize<T, 32, 16, 4>(wp, pp, ap, num_blocks); break;
      default: TORCH_CHECK(false, "moequant.quantize_nf4: unsupported blocksize ", blocksize);
    }
  });
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_statistics_cuda(const at::Tensor& absmax) {
  check_compress_statistics_args(absmax);
  TORCH_CHECK(false, "moequant.compress_statistics: not implemented on CUDA yet");
}

}  // namespace moequant
