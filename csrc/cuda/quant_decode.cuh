// Device-side decoding shared by dequant_expert and the experts kernels. A format is data handed
// to one set of kernels: a 4-bit format (NF4, FP4) is its 16-value codebook, passed by value;
// block scales are read through BlockScales (quant_format.h), plain fp32 absmax or
// double-quantized codes decoded where they are used (kernels take the double quant as a
// template flag so that the plain path keeps its exact instruction stream); int8 rows decode
// with their row scale.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../quant_format.h"
#include "cuda_utils.cuh"

namespace moequant {

// The 16 values of a 4-bit format, indexed by code: a kernel parameter.
struct Codebook16 {
  float v[16];
};

inline Codebook16 codebook16(QuantType type) {
  Codebook16 c{};
  const float* values = codebook_of(type);
  for (int i = 0; i < 16; ++i) c.v[i] = values[i];
  return c;
}

// bitsandbytes' signed dynamic map (double-quantized statistics), copied by each kernel that
// needs it into shared memory: codes index it at random. The table lives in global memory, not
// __constant__: the copy reads a different element in every lane, which the constant cache
// serializes (32 replays per warp, cold at each kernel start), where a global read is one
// coalesced 128-byte request per warp.
struct DynamicMapTable {
  float v[256];
};
__device__ static const DynamicMapTable kDynamicMapDevice = {MOEQUANT_DYNAMIC_MAP_VALUES};

__device__ __forceinline__ void fill_dynamic_map(float* map) {
  for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = __ldg(kDynamicMapDevice.v + i);
}

// The same copy in two phases, for a kernel of kThreads threads whose prologue has other loads to
// wait for: each thread loads its entries into registers first (load) and stores them after issuing
// the others (store), so that the map's load latency overlaps theirs instead of preceding them.
template <int kThreads>
struct DynamicMapEntries {
  static constexpr int kPerThread = (256 + kThreads - 1) / kThreads;
  float v[kPerThread];
  __device__ __forceinline__ void load() {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int i = k * kThreads + static_cast<int>(threadIdx.x);
      if (i < 256) v[k] = __ldg(kDynamicMapDevice.v + i);
    }
  }
  __device__ __forceinline__ void store(float* map) const {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int i = k * kThreads + static_cast<int>(threadIdx.x);
      if (i < 256) map[i] = v[k];
    }
  }
};

// The scales of one matrix's blocks (plain or double-quantized), with the dynamic map in shared
// memory. A block's scale is loaded early (load: the absmax, or the group scale and the 8-bit
// code) and resolved where it is used (resolve), so that kernels keep their loads in flight.
struct LoadedScale {
  float value;    // plain: the absmax; double quant: the group scale
  uint32_t code;  // double quant: the 8-bit code
};

template <bool kDoubleQuant>
struct MatrixScales {
  const float* absmax = nullptr;  // plain: this matrix's absmax
  const uint8_t* code = nullptr;  // double quant: this matrix's codes, group scales, offset
  const float* scale = nullptr;
  float offset = 0.0f;
  const float* map = nullptr;

  __device__ __forceinline__ MatrixScales(const BlockScales& s, int64_t matrix, const float* shared_map) {
    if constexpr (kDoubleQuant) {
      code = s.code + matrix * s.blocks_per_matrix;
      scale = s.scale + matrix * s.groups_per_matrix;
      offset = __ldg(s.offset + matrix);
      map = shared_map;
    } else {
      absmax = s.absmax + matrix * s.blocks_per_matrix;
    }
  }

  // `block` counts blocks from the start of the matrix: uint32_t where the caller knows that the
  // matrix's blocks fit (32-bit index math in hot loops), any other integer as int64_t.
  template <typename Index>
  __device__ __forceinline__ LoadedScale load(Index index) const {
    using B = std::conditional_t<std::is_same_v<Index, uint32_t>, uint32_t, int64_t>;
    const B block = static_cast<B>(index);
    if constexpr (kDoubleQuant) {
      return {__ldg(scale + block / static_cast<B>(kDoubleQuantGroup)), static_cast<uint32_t>(__ldg(code + block))};
    } else {
      return {__ldg(absmax + block), 0u};
    }
  }

  // The block's absmax: bnb's (map[code] * group scale) + offset, two IEEE roundings.
  __device__ __forceinline__ float resolve(LoadedScale l) const {
    if constexpr (kDoubleQuant) {
      return dynamic_map_decode(static_cast<uint8_t>(l.code), l.value, offset, map);
    } else {
      return l.value;
    }
  }
};

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
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t code = (bytes >> (i % 2 == 0 ? 8 * (i / 2) + 4 : 8 * (i / 2))) & 0xFu;
      o[i] = __float_as_uint(__fmul_rn(codebook[code], amax));
    }
  } else {
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
constexpr int kPairTableEntries = 256 * kLaneTableCopies;
static_assert(sizeof(float2) == kLaneTableEntryBytes);

__device__ __forceinline__ void fill_pair_table(float2* table, const Codebook16& codebook) {
  for (int j = threadIdx.x; j < kPairTableEntries; j += blockDim.x) {
    const int b = j / kLaneTableCopies;
    table[j] = make_float2(codebook.v[b >> 4], codebook.v[b & 0xF]);
  }
}

// Byte offset of the entry of byte i (0..3, a compile-time constant after unrolling) of `word` in
// the lane's copy of a table with 128-byte rows (every pair table): the byte shifted to bits 7..14.
__device__ __forceinline__ uint32_t pair_entry_offset(uint32_t word, int i, uint32_t lane_offset) {
  return lane_table_offset<0x7F80>(i == 0 ? word << 7 : word >> (8 * i - 7), lane_offset);
}

// The two decoded codes of byte i (0..3) of `word`; lane_offset = lane_table_copy_offset().
__device__ __forceinline__ float2 pair_lookup(const float2* table, uint32_t word, int i, uint32_t lane_offset) {
  const uint32_t offset = pair_entry_offset(word, i, lane_offset);
  return *reinterpret_cast<const float2*>(reinterpret_cast<const char*>(table) + offset);
}

// The pair table with 16-bit entries, in the float2 table's 32 KB: (byte b, copy c) at byte
// b * 128 + c * 4 holds b's two codes as a half2 (high nibble in the low half), 32 copies. A warp's
// 4-byte lookups are one shared-memory wavefront where the float2 table's 8-byte ones are two: for
// kernels bound by shared-memory bandwidth (the decode GEMV on 16-bit inputs). The codes are
// rounded to fp16 (11 significant bits).
constexpr int kHalfPairCopies = 32;
static_assert(kHalfPairCopies * 4 == kLaneTableCopies * kLaneTableEntryBytes, "both tables have 128-byte rows");

// Fills a table of 32-bit entries (kHalfPairCopies copies of each byte's) with entry_of_byte(b).
__device__ __forceinline__ void fill_pair_table32(float2* table, auto entry_of_byte) {
  uint32_t* entries = reinterpret_cast<uint32_t*>(table);
  for (int j = threadIdx.x; j < 256 * kHalfPairCopies; j += blockDim.x) entries[j] = entry_of_byte(j / kHalfPairCopies);
}

__device__ __forceinline__ void fill_half_pair_table(float2* table, const Codebook16& codebook) {
  fill_pair_table32(table, [&](int b) {
    const __half2 v = __floats2half2_rn(codebook.v[b >> 4], codebook.v[b & 0xF]);
    return *reinterpret_cast<const uint32_t*>(&v);
  });
}

__device__ __forceinline__ uint32_t half_pair_lane_offset() { return threadIdx.x % kHalfPairCopies * 4u; }

// The two codes of byte i (0..3) of `word` from the 16-bit table, as floats.
__device__ __forceinline__ float2 half_pair_lookup(const float2* table, uint32_t word, int i, uint32_t lane_offset) {
  const uint32_t offset = pair_entry_offset(word, i, lane_offset);
  return __half22float2(*reinterpret_cast<const __half2*>(reinterpret_cast<const char*>(table) + offset));
}

// The pair table as tensor-core operands, in the same 32 KB: (byte b, copy c) at byte b * 128 + c * 4
// holds b's two codes as a packed pair of T (bfloat16 or half; the high nibble, the lower input
// index, in the low half): the register an mma.sync A fragment takes for two weights of a row.
template <typename T>
__device__ __forceinline__ void fill_mma_pair_table(float2* table, const Codebook16& codebook) {
  fill_pair_table32(table, [&](int b) { return pack2<T>(codebook.v[b >> 4], codebook.v[b & 0xF]); });
}

// The packed pair of byte i (0..3) of `word`; lane_offset = half_pair_lane_offset().
__device__ __forceinline__ uint32_t mma_pair_lookup(const float2* table, uint32_t word, int i, uint32_t lane_offset) {
  const uint32_t offset = pair_entry_offset(word, i, lane_offset);
  return *reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(table) + offset);
}

// Packed bytes of one 16-byte output chunk: 4 for 16-bit outputs (8 values), 2 for fp32 (4 values).
template <typename T>
using PackedChunk = std::conditional_t<sizeof(T) == 4, uint16_t, uint32_t>;
// int8 codes of one 16-byte output chunk: 8 for 16-bit outputs, 4 for fp32.
template <typename T>
using Int8Chunk = std::conditional_t<sizeof(T) == 4, uint32_t, uint2>;

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
__device__ __forceinline__ uint2 load_packed(const uint2* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

template <bool kStreamingStore>
__device__ __forceinline__ void store_chunk(uint4* p, uint4 v) {
  if constexpr (kStreamingStore) {
    __stcs(p, v);
  } else {
    *p = v;
  }
}

// One warp's tile of a 4-bit dequant within one matrix: output chunks [tile, tile + 32 * CHUNKS)
// of num_chunks, lane l taking chunks l, l + 32, ...: every load and every 16-byte store of the
// warp is contiguous. All loads are issued before the first decode. Chunk g reads in[g] and the
// scale of block first_block + (g >> log2 chunks per block) of the matrix (a chunk never
// straddles a block); `codebook` is the format's 16 values in shared memory (a run-time index
// into a register array would go to local memory). Streaming (evict-first) stores suit outputs
// nobody re-reads soon; scratch about to feed a GEMM keeps plain stores so that it can stay in L2.
template <typename T, int CHUNKS, bool kStreamingStore, bool kDoubleQuant>
__device__ __forceinline__ void dequant_warp_tile(const PackedChunk<T>* __restrict__ in,
                                                  const MatrixScales<kDoubleQuant>& scales, int64_t first_block,
                                                  uint4* __restrict__ out, int64_t tile, int64_t num_chunks,
                                                  int log2_chunks_per_block, const float* codebook) {
  const int lane = threadIdx.x % 32;
  uint32_t bytes[CHUNKS];
  LoadedScale amax[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t g = tile + c * 32 + lane;
    if (g < num_chunks) {
      bytes[c] = load_packed(in + g);
      amax[c] = scales.load(first_block + (g >> log2_chunks_per_block));
    }
  }
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t g = tile + c * 32 + lane;
    if (g < num_chunks) store_chunk<kStreamingStore>(out + g, decode_chunk<T>(bytes[c], scales.resolve(amax[c]), codebook));
  }
}

// Row of element `e` (< 2^32) of a matrix with `cols` columns, by multiply-high: q = e / cols
// for every 32-bit e (round-up magic number, libdivide's branch-free form).
struct RowDivider {
  uint32_t magic = 0, shift1 = 0, shift2 = 0;
  RowDivider() = default;
  explicit RowDivider(uint32_t d) {
    int l = 0;
    while ((uint64_t{1} << l) < d) ++l;  // ceil(log2 d)
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1);
    shift1 = l > 0 ? 1 : 0;
    shift2 = l > 0 ? l - 1 : 0;
  }
  __device__ __forceinline__ uint32_t operator()(uint32_t e) const {
    const uint32_t t = __umulhi(magic, e);
    return (t + ((e - t) >> shift1)) >> shift2;
  }
};

// Two int8 codes and their row scales -> two values packed as the output type.
template <typename T>
__device__ __forceinline__ uint32_t decode_int8_pair(uint32_t word, int i, float s0, float s1) {
  const float a = int8_decode(static_cast<int8_t>((word >> (16 * i)) & 0xFF), s0);
  const float b = int8_decode(static_cast<int8_t>((word >> (16 * i + 8)) & 0xFF), s1);
  return pack2<T>(a, b);
}

// ---- int8 codes in the fused GEMM kernels (register fragments) ----------------------------
// Four int8 codes of a word as handed to int8_code_value: each byte XOR 0x80 (q + 128, unsigned).
__device__ __forceinline__ uint32_t int8_bias(uint32_t word) { return word ^ 0x80808080u; }

// Code i (0..3, a compile-time constant after unrolling) of a biased word as an exact fp32 value:
// the byte laid into the low mantissa bits of 2^23, minus 2^23 + 128. A byte permute and an add
// on the fp32 pipe instead of an int -> float conversion (a quarter-rate unit); the value is the
// same, every int8 being exact in fp32.
__device__ __forceinline__ float int8_code_value(uint32_t biased, int i) {
  return __fsub_rn(__uint_as_float(__byte_perm(biased, 0x4B00u, 0x5440u + i)), 8388736.0f);
}

// Codes 2 i and 2 i + 1 of a biased word, decoded with their row's scale as int8_decode
// (quant_format.h) rounds them, packed with code 2 i in the low half (the lower k of an mma pair).
template <typename T>
__device__ __forceinline__ uint32_t decode_int8_row_pair(uint32_t biased, int i, float row_absmax) {
  return pack2<T>(int8_decode_value(int8_code_value(biased, 2 * i), row_absmax),
                  int8_decode_value(int8_code_value(biased, 2 * i + 1), row_absmax));
}

// One warp's tile of an int8 dequant over a slice of one matrix: chunk g holds slice elements
// [g * kElems, (g + 1) * kElems) (the slice starts on a row, so element e of the slice is in
// row e / cols of it); `row_absmax` points at the slice's first row. When cols is a multiple of
// the chunk the chunk has one row; otherwise each element finds its own.
template <typename T, int CHUNKS, bool kStreamingStore>
__device__ __forceinline__ void dequant_int8_warp_tile(const Int8Chunk<T>* __restrict__ in,
                                                       const float* __restrict__ row_absmax, RowDivider rows,
                                                       bool chunk_in_one_row, uint4* __restrict__ out, int64_t tile,
                                                       int64_t num_chunks) {
  constexpr int kElems = 16 / sizeof(T);
  const int lane = threadIdx.x % 32;
  Int8Chunk<T> codes[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t g = tile + c * 32 + lane;
    if (g < num_chunks) {
      if constexpr (sizeof(T) == 4) {
        codes[c] = load_packed(reinterpret_cast<const uint32_t*>(in + g));
      } else {
        codes[c] = load_packed(in + g);
      }
    }
  }
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t g = tile + c * 32 + lane;
    if (g >= num_chunks) continue;
    const uint32_t e0 = static_cast<uint32_t>(g * kElems);
    float s[kElems];
    if (chunk_in_one_row) {
      const float r = __ldg(row_absmax + rows(e0));
#pragma unroll
      for (int i = 0; i < kElems; ++i) s[i] = r;
    } else {
#pragma unroll
      for (int i = 0; i < kElems; ++i) s[i] = __ldg(row_absmax + rows(e0 + i));
    }
    uint4 v;
    uint32_t* o = reinterpret_cast<uint32_t*>(&v);
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        o[i] = __float_as_uint(int8_decode(static_cast<int8_t>((codes[c] >> (8 * i)) & 0xFF), s[i]));
      }
    } else {
      o[0] = decode_int8_pair<T>(codes[c].x, 0, s[0], s[1]);
      o[1] = decode_int8_pair<T>(codes[c].x, 1, s[2], s[3]);
      o[2] = decode_int8_pair<T>(codes[c].y, 0, s[4], s[5]);
      o[3] = decode_int8_pair<T>(codes[c].y, 1, s[6], s[7]);
    }
    store_chunk<kStreamingStore>(out + g, v);
  }
}

}  // namespace moequant
