// Pieces shared by the fused grouped GEMM kernels (experts_nf4_gemm.cu, mma.sync on sm80+;
// experts_nf4_wgmma.cu, wgmma on sm90a): the CTA row-tile record, the shared-memory swizzle,
// cp.async copies, the decode of one packed byte into two weights and the kernels' format
// arguments. The kernels decode any 4-bit codebook (NF4, FP4: a kernel parameter) and plain or
// double-quantized block scales (a template flag; the scales of a block are decoded where used),
// and int8 row-wise stacks (a template flag selecting how a thread's code bytes are loaded and
// decoded: one byte a weight, one scale per stored row; main loops, tiles and epilogues shared).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../experts_tile_plan.h"  // RowTile
#include "quant_decode.cuh"

namespace moequant {

constexpr int kNF4GemmTileK = 64;   // input-dimension elements per k-tile
constexpr int kChunkWeights = 32;   // NF4 codes per 16-byte packed chunk
constexpr int kInt8ChunkWeights = 16;  // int8 codes per 16-byte chunk

// Bytes of codes before element `elem` of a stack: half a byte a weight for 4-bit formats, one for
// int8. 64-bit: stacks exceed 2^31 elements.
template <bool kInt8>
__device__ __forceinline__ int64_t code_bytes(int64_t elem) {
  return kInt8 ? elem : elem / 2;
}

// Byte offset of 16-byte chunk `c` of row `r` in a tile of `chunks_per_row` chunks (a multiple of
// 8): the chunk's low 3 bits are XOR-ed with the row's, so the same chunk of 8 consecutive rows
// lands in 8 different bank groups (with 8 chunks a row: the wgmma 128-byte swizzle).
__device__ __forceinline__ uint32_t swizzle(int r, int c, int chunks_per_row) {
  return static_cast<uint32_t>((r * chunks_per_row + (c ^ (r & 7))) * 16);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Global -> shared copies that bypass the registers; zero-filled when !valid (the source must
// still be a valid address).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 8 : 0));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// 16 packed bytes, read once (no L1 allocation).
__device__ __forceinline__ uint4 load_packed16(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// What a fused GEMM kernel decodes weights with: the format's codebook and the stack's block
// scales (BlockScales; map unset, the kernel points it at its shared copy). For int8 stacks the
// codebook is unused and the scales are the row absmax (one "block" per stored row); `type`
// tells the launchers which decode variant to instantiate.
struct Quant4Args {
  BlockScales scales;
  Codebook16 codebook;
  QuantType type = QuantType::kNF4;
};

// Shared-memory tables of a fused kernel: the byte-pair table of the codebook and, with double
// quant, the dynamic map. Filled by all threads; the caller synchronizes before use. A table the
// variant does not read takes no bytes (int8 stacks need neither, plain stacks no map): footprints
// decide the SM's shared-memory carveout, and 16 unused bytes cost the 128-row wgmma kernel
// 40% (the static_asserts after WgmmaTileShape and WgmmaKnTileShape, experts_nf4_wgmma.cu).
template <bool kPresent>
struct PairTableStorage {
  float2 pair[kPairTableEntries];
};
template <>
struct PairTableStorage<false> {
  static constexpr float2* pair = nullptr;
};
template <bool kPresent>
struct DynamicMapStorage {
  float map[256];
};
template <>
struct DynamicMapStorage<false> {
  static constexpr float* map = nullptr;
};

template <bool kDoubleQuant, bool kInt8 = false>
struct DecodeTables : PairTableStorage<!kInt8>, DynamicMapStorage<kDoubleQuant> {
  static_assert(!(kDoubleQuant && kInt8), "int8 stacks have no double-quantized statistics");
  __device__ __forceinline__ void fill(const Codebook16& codebook) {
    if constexpr (!kInt8) fill_pair_table(this->pair, codebook);
    if constexpr (kDoubleQuant) fill_dynamic_map(this->map);
  }
};

// Two weights of byte i (0..3) of `word` (codes times the block's absmax, as dequant_expert
// rounds them), packed as the low and high halves of an mma operand register.
template <typename T>
__device__ __forceinline__ uint32_t decode_byte(const float2* table, uint32_t word, int i, uint32_t lane_offset,
                                                float scale) {
  const float2 v = pair_lookup(table, word, i, lane_offset);
  return pack2<T>(__fmul_rn(v.x, scale), __fmul_rn(v.y, scale));
}

}  // namespace moequant
