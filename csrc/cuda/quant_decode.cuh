// Device-side NF4 decoding of 16-byte output chunks and the warp tile loop built on it, shared by
// dequant_expert and the experts kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../nf4_format.h"
#include "cuda_utils.cuh"

namespace moequant {

__device__ __constant__ static const float kNF4ValuesDevice[16] = MOEQUANT_NF4_VALUES;

// Two decoded values rounded to nearest-even and packed into 4 bytes.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Decodes one chunk (the codes of `bytes`, high nibble first) into a 16-byte vector: 4 packed
// bytes -> 8 16-bit values, or 2 packed bytes (low half of `bytes`) -> 4 fp32 values.
template <typename T>
__device__ __forceinline__ uint4 decode_chunk(uint32_t bytes, float amax, const float* codebook) {
  uint4 out;
  uint32_t* o = reinterpret_cast<uint32_t*>(&out);
  if constexpr (std::is_same_v<T, float>) {
    // 2 bytes -> 4 fp32 values.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t code = (bytes >> (i % 2 == 0 ? 8 * (i / 2) + 4 : 8 * (i / 2))) & 0xFu;
      o[i] = __float_as_uint(__fmul_rn(codebook[code], amax));
    }
  } else {
    // 4 bytes -> 8 16-bit values.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float hi = __fmul_rn(codebook[(bytes >> (8 * i + 4)) & 0xFu], amax);
      const float lo = __fmul_rn(codebook[(bytes >> (8 * i)) & 0xFu], amax);
      o[i] = pack2<T>(hi, lo);
    }
  }
  return out;
}

// Byte-pair table in shared memory, kLaneTableCopies lane-interleaved copies (cuda_utils.cuh):
// entry (byte b, copy c) at float2 index b * 16 + c holds the values of b's two codes (high
// nibble first), so one 8-byte read decodes two weights without bank conflicts (32 KB).
constexpr int kNF4PairTableEntries = 256 * kLaneTableCopies;
static_assert(sizeof(float2) == kLaneTableEntryBytes);

__device__ __forceinline__ void fill_nf4_pair_table(float2* table) {
  for (int j = threadIdx.x; j < kNF4PairTableEntries; j += blockDim.x) {
    const int b = j / kLaneTableCopies;
    table[j] = make_float2(kNF4ValuesDevice[b >> 4], kNF4ValuesDevice[b & 0xF]);
  }
}

// The two decoded codes of byte i (0..3, a compile-time constant after unrolling) of `word`;
// lane_offset = lane_table_copy_offset().
__device__ __forceinline__ float2 nf4_pair_lookup(const float2* table, uint32_t word, int i, uint32_t lane_offset) {
  const uint32_t offset = lane_table_offset<0x7F80>(i == 0 ? word << 7 : word >> (8 * i - 7), lane_offset);
  return *reinterpret_cast<const float2*>(reinterpret_cast<const char*>(table) + offset);
}

// Packed bytes of one 16-byte output chunk: 4 for 16-bit outputs (8 values), 2 for fp32 (4 values).
template <typename T>
using PackedChunk = std::conditional_t<sizeof(T) == 4, uint16_t, uint32_t>;

// Packed bytes are read once: no L1 allocation, and a 256-byte L2 prefetch per request (H200,
// benchmarks/nf4_dequant_variants.cu: +0.5-1% of copy bandwidth).
__device__ __forceinline__ uint32_t load_packed(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t load_packed(const uint16_t* p) {
  uint16_t v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

// One warp's tile of a dequant: output chunks [tile, tile + 32 * CHUNKS) of num_chunks, lane l
// taking chunks l, l + 32, ...: every load and every 16-byte store of the warp is contiguous.
// All loads are issued before the first decode. Chunk g reads in[g] and absmax[g >> log2 chunks
// per block] (a chunk never straddles an NF4 block); `codebook` is kNF4ValuesDevice in shared
// memory (a run-time index into a register array would go to local memory). Streaming
// (evict-first) stores suit outputs nobody re-reads soon; scratch about to feed a GEMM keeps
// plain stores so that it can stay in L2.
template <typename T, int CHUNKS, bool kStreamingStore>
__device__ __forceinline__ void dequant_warp_tile(const PackedChunk<T>* __restrict__ in, const float* __restrict__ absmax,
                                                  uint4* __restrict__ out, int64_t tile, int64_t num_chunks,
                                                  int log2_chunks_per_block, const float* codebook) {
  const int lane = threadIdx.x % 32;
  uint32_t bytes[CHUNKS];
  float amax[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t g = tile + c * 32 + lane;
    if (g < num_chunks) {
      bytes[c] = load_packed(in + g);
      amax[c] = absmax[g >> log2_chunks_per_block];
    }
  }
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t g = tile + c * 32 + lane;
    if (g < num_chunks) {
      const uint4 v = decode_chunk<T>(bytes[c], amax[c], codebook);
      if constexpr (kStreamingStore) {
        __stcs(out + g, v);
      } else {
        out[g] = v;
      }
    }
  }
}

}  // namespace moequant
