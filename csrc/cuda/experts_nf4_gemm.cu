// Fused grouped GEMM (rung (b)): out[rows of e] = in[rows of e] @ M_e with M_e the stored matrix
// S_e of the packed stack ([N, K], M_e = S_e^T) or S_e itself ([K, N]), decoded on the fly. One
// set of kernels for every format: the codebook (NF4, FP4) is a kernel parameter, double-quantized
// block scales are decoded where a block's scale is used (a template flag), and int8 row-wise
// stacks are a decode variant (template flag kInt8: how a thread loads and decodes its code bytes;
// one byte a weight, one scale per stored row, no codebook table).
//
// A CTA owns BM routing-order rows of one expert times BN output columns and walks the input
// dimension in k-tiles of 64: the rows of `in` stream through a cp.async ring in shared memory,
// the weights are decoded with a conflict-free byte -> two-value table (quant_decode.cuh) into
// the compute dtype, exactly as dequant_expert rounds them, and multiplied on the tensor cores
// (mma.sync m16n8k16, fp32 accumulation). Weights are read once, as stored; nothing dequantized
// reaches global memory. Each output element is owned by one thread and summed in a fixed order:
// results are deterministic. Two kernels, one per stored orientation (see each); on Hopper the
// [N, K] products run on wgmma instead (experts_nf4_wgmma.cu), with the same row-tile plan, and
// so do the [K, N] products of 128-row tiles (MOEQUANT_KN_WGMMA chooses the heights).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../experts_tile_plan.h"
#include "experts_common.cuh"
#include "experts_nf4_gemm.cuh"
#include "experts_nf4_tiles.cuh"
#include "experts_nf4_wgmma.cuh"

namespace moequant {
namespace {

constexpr int kTileK = kNF4GemmTileK;

// A CTA tile: BM rows x BN columns, split among kWarpsM x kWarpsN warps of WM = BM / kWarpsM rows
// by WN columns. Warps side by side along the columns decode disjoint weights; warps stacked along
// the rows share theirs (the [N, K] kernel decodes them once per warp row, trading decode work for
// fewer shared-memory reads of the input rows per mma).
// kStages: depth of the cp.async ring of k-tiles (kStages - 1 in flight).
template <int BM_, int kWarpsM_, int kWarpsN_, int WN_, int kStages_ = 4>
struct TileShape {
  static constexpr int BM = BM_, kWarpsM = kWarpsM_, kWarpsN = kWarpsN_, WN = WN_, kStages = kStages_;
  static_assert(kStages >= 2, "a ring of at least two stages");
  static constexpr int WM = BM / kWarpsM, BN = kWarpsN * WN, kWarps = kWarpsM * kWarpsN;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int MI = WM / 16, NI = WN / 8;  // mma tiles per warp
  static constexpr int kSmemA = BM * kTileK * 2;   // rows of `in` per stage
  static_assert(WM % 16 == 0 && WN % 16 == 0 && BN % 64 == 0, "whole ldmatrix blocks and swizzle rows");
};

// 8 packed bytes, read once (no L1 allocation).
__device__ __forceinline__ uint2 load_packed8(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

// What both kernels start from: the CTA's tile of rows and columns, and this thread's place in it.
template <typename T, class S>
struct CtaTile {
  int64_t n0, row0, w0;  // first output column, first routing-order row, first element of the expert
  int64_t expert;
  int rows;              // valid rows of the tile (<= BM)
  const T* in_rows;      // the tile's first row of `in`
  int warp, lane;
  int wm0, wn0;          // the warp's first row and column within the tile
  __device__ CtaTile(const T* in, const RowTile* tiles, int n_tiles, int64_t N, int64_t K) {
    const RowTile t = tiles[blockIdx.x / n_tiles];
    n0 = int64_t{blockIdx.x % n_tiles} * S::BN;
    row0 = t.row_begin;
    rows = min(S::BM, t.row_end - t.row_begin);
    expert = t.expert;
    w0 = expert * N * K;
    in_rows = in + row0 * K;
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
    wm0 = warp / S::kWarpsN * S::WM;
    wn0 = warp % S::kWarpsN * S::WN;
  }
};

template <typename T, class S>
__device__ __forceinline__ void store_tile(const float (&acc)[S::MI][S::NI][4], const CtaTile<T, S>& ct, T* out,
                                           int64_t N) {
  const int wn0 = ct.wn0, lane = ct.lane;
#pragma unroll
  for (int mi = 0; mi < S::MI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < S::NI; ++ni) {
      const int64_t col = ct.n0 + wn0 + ni * 8 + 2 * (lane % 4);
      if (col >= N) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = ct.wm0 + mi * 16 + lane / 4 + 8 * h;
        if (r < ct.rows) {
          *reinterpret_cast<uint32_t*>(out + (ct.row0 + r) * N + col) =
              pack2<T>(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        }
      }
    }
  }
}

// A fragments of k16 step `ks` for the warp's MI row blocks, from a swizzled [BM][kTileK] stage.
template <typename T, class S>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[S::MI][4], uint32_t a_base, int ks,
                                                 const CtaTile<T, S>& ct) {
#pragma unroll
  for (int mi = 0; mi < S::MI; ++mi) {
    ldmatrix_x4<false>(a[mi], a_base + swizzle(ct.wm0 + mi * 16 + (ct.lane & 15), ks * 2 + (ct.lane >> 4), 8));
  }
}

// Stored S_e = [N, K] (weight rows are output features; the forward of the standard layout). Each
// lane decodes its mma B fragments straight from 8 packed bytes it loads itself, never through
// shared memory. The fragment of lane (g, q) = (lane / 4, lane % 4) for the k16 step ks holds
// k-pairs q and q + 4 of that step; the kernel lets that slot stand for the input pair 8q + 2ks
// (+1), so that a lane's 8 slots of a k-tile are the 8 contiguous bytes [8q, 8q + 8) of its row's
// 32-byte k-tile segment (one 8-byte load, the quad's 32 bytes one sector), and permutes the input
// rows the same way as they land in shared memory (4-byte cp.async): pair p of a row goes to
// chunk p % 8, slot p / 8. Sums over k do not care about the order.
//
// int8 stacks (kInt8) keep those slots, hence the same permutation of the input rows: a lane's 8
// slots of a k-tile are elements [16 q, 16 q + 16) of its row's 64-byte k-tile segment, i.e. 16
// code bytes (one 16-byte load). Step ks reads word ks of them: bytes 0, 1 are the pair of slot q
// (input pair 8 q + 2 ks), bytes 2, 3 that of slot q + 4 (8 q + 2 ks + 1). The row's scale is the
// same for every k: loaded once, before the K loop.
template <typename T, class S, bool kDoubleQuant, bool kInt8>
__global__ void __launch_bounds__(S::kThreads)
nf4_gemm_nk_kernel(const T* __restrict__ in, T* __restrict__ out, const uint8_t* __restrict__ packed,
                   const __grid_constant__ Quant4Args args, const RowTile* __restrict__ tiles, int64_t N, int64_t K,
                   int n_tiles, int log2_blocksize) {
  extern __shared__ __align__(16) uint8_t a_stages[];  // kStages x [BM][kTileK], swizzled and permuted
  __shared__ DecodeTables<kDoubleQuant, kInt8> tables;
  tables.fill(args.codebook);
  const float2* const pair_table = tables.pair;
  const CtaTile<T, S> ct(in, tiles, n_tiles, N, K);
  const MatrixScales<kDoubleQuant> scales(args.scales, ct.expert, tables.map);
  const int warp = ct.warp, lane = ct.lane, wn0 = ct.wn0;
  const uint32_t lane_offset = lane_table_copy_offset();

  // A warp copies whole rows of a k-tile (32 pairs, one per lane): lane l moves pair l of rows
  // warp + i * kWarps to chunk l % 8, slot l / 8. Rows past the tile's end are zero-filled.
  // Addresses are set up once: the swizzle of row r only depends on r & 7, which is warp & 7
  // xor (i * kWarps) & 7, a compile-time 0 or 4 per i.
  static_assert(S::BM % S::kWarps == 0 && S::BM / S::kWarps <= 32, "every warp copies the same rows");
  const T* const a_src = ct.in_rows + warp * K + 2 * lane;
  const int64_t a_row_step = int64_t{S::kWarps} * K;
  const uint32_t a_dst[2] = {swizzle(warp & 7, lane % 8, 8) - (warp & 7) * 128 + (lane / 8) * 4,
                             swizzle((warp & 7) ^ 4, lane % 8, 8) - ((warp & 7) ^ 4) * 128 + (lane / 8) * 4};
  uint32_t a_rows_valid = 0;
#pragma unroll
  for (int i = 0; i < S::BM / S::kWarps; ++i) a_rows_valid |= uint32_t{warp + i * S::kWarps < ct.rows} << i;
  auto load_a = [&](int slot, int64_t k0) {
    const uint32_t stage = smem_addr(a_stages + slot * S::kSmemA) + warp * 128;
    const T* src = a_src + k0;
#pragma unroll
    for (int i = 0; i < S::BM / S::kWarps; ++i, src += a_row_step) {
      const uint32_t dst = stage + i * S::kWarps * 128 + a_dst[(i * S::kWarps / 4) & 1];
      const bool valid = (a_rows_valid >> i) & 1u;
      cp_async4(dst, valid ? src : in, valid);  // a zero-fill still names a valid address
    }
  };
  // This lane's packed bytes and absmax of one k-tile, for each of its NI n8 blocks: 16 codes
  // from element row_elem[j] + k0 of the stack (-1: a column past N, never stored). int8: 16
  // code bytes, and the row's scale in row_scale[j] for the whole K loop (0 past N).
  int64_t row_elem[S::NI];
  float row_scale[S::NI];
#pragma unroll
  for (int j = 0; j < S::NI; ++j) {
    const int64_t n = ct.n0 + wn0 + 8 * j + lane / 4;
    row_elem[j] = n < N ? ct.w0 + n * K + 16 * (lane % 4) : -1;
    row_scale[j] = 0.0f;
    if constexpr (kInt8) {
      if (n < N) row_scale[j] = scales.load(n).value;
    }
  }
  struct Codes {
    std::conditional_t<kInt8, uint4, uint2> bytes[S::NI];
    LoadedScale scale[S::NI];  // 4-bit: the block scale
  };
  auto load_b = [&](Codes& c, int64_t k0) {
#pragma unroll
    for (int j = 0; j < S::NI; ++j) {
      c.bytes[j] = {};
      c.scale[j] = LoadedScale{0.0f, 0u};
      if (row_elem[j] >= 0) {
        const int64_t elem = row_elem[j] + k0;
        if constexpr (kInt8) {
          c.bytes[j] = load_packed16(packed + elem);
        } else {
          c.bytes[j] = load_packed8(packed + elem / 2);
          c.scale[j] = scales.load((elem - ct.w0) >> log2_blocksize);
        }
      }
    }
  };

  float acc[S::MI][S::NI][4] = {};
  auto compute = [&](int slot, const Codes& c) {
    const uint32_t a_base = smem_addr(a_stages + slot * S::kSmemA);
    float amax[S::NI];
#pragma unroll
    for (int j = 0; j < S::NI; ++j) amax[j] = kInt8 ? row_scale[j] : scales.resolve(c.scale[j]);
#pragma unroll
    for (int ks = 0; ks < kTileK / 16; ++ks) {
      uint32_t a[S::MI][4];
      load_a_fragments<T, S>(a, a_base, ks, ct);
#pragma unroll
      for (int j = 0; j < S::NI; ++j) {
        uint32_t b0, b1;
        if constexpr (kInt8) {
          const uint32_t word = int8_bias(ks == 0 ? c.bytes[j].x
                                          : ks == 1 ? c.bytes[j].y
                                          : ks == 2 ? c.bytes[j].z
                                                    : c.bytes[j].w);
          b0 = decode_int8_row_pair<T>(word, 0, amax[j]);  // slot q: input pair 8 q + 2 ks
          b1 = decode_int8_row_pair<T>(word, 1, amax[j]);  // slot q + 4: 8 q + 2 ks + 1
        } else {
          const uint32_t word = ks < 2 ? c.bytes[j].x : c.bytes[j].y;
          b0 = decode_byte<T>(pair_table, word, (2 * ks) % 4, lane_offset, amax[j]);
          b1 = decode_byte<T>(pair_table, word, (2 * ks + 1) % 4, lane_offset, amax[j]);
        }
#pragma unroll
        for (int mi = 0; mi < S::MI; ++mi) mma_16816<T>(acc[mi][j], a[mi], b0, b1);
      }
    }
  };

  const int64_t k_tiles = K / kTileK;
#pragma unroll
  for (int s = 0; s < S::kStages - 1; ++s) {
    if (s < k_tiles) load_a(s, s * kTileK);
    cp_async_commit();
  }
  // Packed codes: two register sets, each reloaded two k-tiles ahead once consumed (four sets
  // measured 1-6% slower on the H100).
  Codes codes[2];
  load_b(codes[0], 0);
  if (k_tiles > 1) load_b(codes[1], kTileK);
  __syncthreads();  // decode tables
  for (int64_t kt = 0; kt < k_tiles; kt += 2) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t t = kt + u;
      if (t < k_tiles) {
        cp_async_wait<S::kStages - 2>();
        __syncthreads();  // k-tile t of `in` landed for every thread; slot t - 1 is free
        const int64_t next = t + S::kStages - 1;
        if (next < k_tiles) load_a(static_cast<int>(next % S::kStages), next * kTileK);
        cp_async_commit();
        compute(static_cast<int>(t % S::kStages), codes[u]);
        if (t + 2 < k_tiles) load_b(codes[u], (t + 2) * kTileK);
      }
    }
  }
  store_tile<T, S>(acc, ct, out, N);
}

// How the [K, N] kernel gets 4-bit block scales: through registers (nf4_gemm_kn_regs_kernel),
// loaded one k-tile ahead by the thread that decodes the chunk, or through the shared-memory
// stages (double quant: the group scale and the 4-byte word holding the 8-bit code, two more
// 4-byte cp.async a chunk; plain: the absmax, one). Registers free 4 KiB of stages, which gives
// 16-row tiles a third CTA per SM (72-73 KiB, see below) and taller ones nothing but 15-30 more
// registers. Double-quantized stacks take registers at every height (MOEQUANT_KN_DQ_SCALES=0:
// shared memory); plain ones at 16 rows (MOEQUANT_KN_PLAIN_SCALES: "0" never, "1" every height,
// a height h: tiles of h rows or fewer). Read once per process.
static bool kn_scales_in_registers(bool double_quant, int height) {
  static const bool dq = [] {
    const char* v = std::getenv("MOEQUANT_KN_DQ_SCALES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  static const int plain_max_height = [] {
    const char* v = std::getenv("MOEQUANT_KN_PLAIN_SCALES");
    if (v == nullptr) return 16;
    const std::string s(v);
    if (s == "0") return 0;
    if (s == "1") return 1 << 30;
    TORCH_CHECK(s == "16" || s == "32" || s == "64" || s == "128",
                "MOEQUANT_KN_PLAIN_SCALES must be 0, 1, 16, 32, 64 or 128, got \"", s, "\"");
    return std::stoi(s);
  }();
  return double_quant ? dq : height <= plain_max_height;
}

// Dynamic shared memory of the [K, N] kernel: a ring of stages (rows of `in`, packed codes,
// their absmax, or with double quant through shared memory their group scale and the 4-byte word
// holding their 8-bit code), then one decoded k-tile. Per CTA, with the static tables (32 KiB pair
// table, 1 KiB map with double quant), against 228 KiB per SM and 1 KiB reserved per CTA (two
// CTAs: at most 113 KiB each, three: 75 KiB): Tile16/32/64 take 76 / 84 / 100 KiB plain and
// 81 / 89 / 105 KiB with double quant through shared memory (two CTAs per SM); with the scales
// through registers (kScaleRegs: the stages hold no scales) 72 / 80 / 96 KiB plain and 73 / 81 /
// 97 KiB with double quant (Tile16: three CTAs). Tile128Kn: 111 KiB plain, 115 KiB with double
// quant through shared memory (one CTA per SM), 108 / 109 KiB through registers (two).
// int8: a 16-byte chunk holds 16 codes (twice the chunks) and its scale is its k row's.
template <class S, bool kDoubleQuant, bool kInt8, bool kScaleRegs = false>
struct KnSmem {
  static_assert(!kScaleRegs || !kInt8, "only 4-bit block scales travel through registers");
  static constexpr int kChunkCodes = kInt8 ? kInt8ChunkWeights : kChunkWeights;  // codes per chunk
  static constexpr int kParts = S::BN / kChunkCodes;             // packed chunks per k row
  static constexpr int kChunks = kTileK * kParts;                // packed chunks per k-tile
  static constexpr int kScaleBytes = kScaleRegs ? 0 : kDoubleQuant ? 8 : 4;  // per chunk
  static constexpr int kStageBytes = S::kSmemA + kChunks * (16 + kScaleBytes);
  static constexpr int kBytes = S::kStages * kStageBytes + kTileK * S::BN * 2;
};

// Stored S_e = [K, N] (weight rows are input features; the backward of the standard layout). A
// lane's mma fragment pairs two k of one column, which sit in two different packed rows here, so
// the packed k-tile goes through shared memory: cp.async'd (with its absmax) by the lanes that
// decode it, decoded into a swizzled [kTileK][BN] tile, read back with ldmatrix.trans. int8
// (kInt8): a chunk is 16 codes of one k row, whose scale is the stored row's (k's) absmax; it
// decodes to two 16-byte chunks of the decoded tile instead of four.
//
// kScaleRegs (4-bit): the thread that decodes chunk c is the one that copies it, so the chunk's
// block scale (plain: the absmax; double quant: the 8-bit code and group scale) skips shared
// memory: loaded into registers (ld.global.nc) one k-tile ahead and resolved in decode with the
// same ops as through shared memory (bit-identical results). Two register sets reloaded two
// k-tiles ahead (the loop unrolled by two) spilled 68 bytes in Tile128Kn under its 128-register
// bound (double quant).
template <typename T, class S, bool kDoubleQuant, bool kInt8, bool kScaleRegs>
__device__ __forceinline__ void nf4_gemm_kn(const T* __restrict__ in, T* __restrict__ out,
                                            const uint8_t* __restrict__ packed, const Quant4Args& args,
                                            const RowTile* __restrict__ tiles, int64_t N, int64_t K, int n_tiles,
                                            int log2_blocksize) {
  using L = KnSmem<S, kDoubleQuant, kInt8, kScaleRegs>;
  constexpr int kParts = L::kParts, kChunks = L::kChunks, kStageBytes = L::kStageBytes, kCodes = L::kChunkCodes;
  constexpr int kChunksPerThread = kChunks / S::kThreads;
  constexpr int kRowChunks = S::BN / 8;                         // 16-byte chunks per decoded row
  static_assert(kChunks % S::kThreads == 0, "every thread decodes the same number of chunks");
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* const stages = smem;                                 // kStages x kStageBytes
  uint8_t* const decoded = smem + S::kStages * kStageBytes;     // [kTileK][BN], swizzled
  __shared__ DecodeTables<kDoubleQuant, kInt8> tables;
  tables.fill(args.codebook);
  const float2* const pair_table = tables.pair;
  const CtaTile<T, S> ct(in, tiles, n_tiles, N, K);
  const MatrixScales<kDoubleQuant> scales(args.scales, ct.expert, tables.map);
  const int lane = ct.lane, wn0 = ct.wn0;
  const uint32_t lane_offset = lane_table_copy_offset();

  // Chunk i of this thread: k row c / kParts, kCodes columns from (c % kParts) * kCodes.
  auto chunk_valid = [&](int c) { return ct.n0 + (c % kParts) * kCodes < N; };
  // Element of the matrix where chunk c of the k-tile at k0 starts.
  auto chunk_elem = [&](int c, int64_t k0) { return (k0 + c / kParts) * N + ct.n0 + (c % kParts) * kCodes; };
  auto load_stage = [&](int slot, int64_t k0) {
    uint8_t* const base = stages + slot * kStageBytes;
    const uint32_t a_dst = smem_addr(base);
    static_assert(S::BM * 8 % S::kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int i = 0; i < S::BM * 8 / S::kThreads; ++i) {
      const int c = threadIdx.x + i * S::kThreads, r = c / 8, ch = c % 8;
      const bool valid = r < ct.rows;
      cp_async16(a_dst + swizzle(r, ch, 8), valid ? ct.in_rows + r * K + k0 + ch * 8 : in, valid);
    }
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      const int c = threadIdx.x + i * S::kThreads;
      if (!chunk_valid(c)) continue;
      const int64_t elem = chunk_elem(c, k0);
      cp_async16(smem_addr(base + S::kSmemA + c * 16), packed + code_bytes<kInt8>(ct.w0 + elem), true);
      if constexpr (!kScaleRegs) {  // kScaleRegs: the scales go through registers (load_scales)
        const int64_t block = kInt8 ? k0 + c / kParts : elem >> log2_blocksize;  // int8: the stored row
        const uint32_t scale_dst = smem_addr(base + S::kSmemA + kChunks * 16 + c * L::kScaleBytes);
        if constexpr (kDoubleQuant) {
          cp_async4(scale_dst, scales.scale + block / kDoubleQuantGroup, true);
          const uintptr_t code = reinterpret_cast<uintptr_t>(scales.code + block);
          cp_async4(scale_dst + 4, reinterpret_cast<const void*>(code & ~uintptr_t{3}), true);
        } else {
          cp_async4(scale_dst, scales.absmax + block, true);
        }
      }
    }
  };
  // kScaleRegs: the block scale of each of this thread's chunks of the k-tile at k0.
  struct ChunkScales {
    LoadedScale s[kChunksPerThread];
  };
  auto load_scales = [&](ChunkScales& cs, int64_t k0) {
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      const int c = threadIdx.x + i * S::kThreads;
      cs.s[i] = chunk_valid(c) ? scales.load(chunk_elem(c, k0) >> log2_blocksize) : LoadedScale{0.0f, 0u};
    }
  };
  auto decode = [&](int slot, int64_t k0, const ChunkScales* cs) {
    const uint8_t* const base = stages + slot * kStageBytes;
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      const int c = threadIdx.x + i * S::kThreads;
      if (!chunk_valid(c)) continue;  // columns past N: whatever is there only reaches masked outputs
      const uint4 codes = *reinterpret_cast<const uint4*>(base + S::kSmemA + c * 16);
      const uint8_t* const scale_src = base + S::kSmemA + kChunks * 16 + c * L::kScaleBytes;
      float scale = kScaleRegs ? scales.resolve(cs->s[i]) : *reinterpret_cast<const float*>(scale_src);
      if constexpr (kDoubleQuant && !kScaleRegs) {
        const uintptr_t code = reinterpret_cast<uintptr_t>(scales.code + (chunk_elem(c, k0) >> log2_blocksize));
        const uint32_t word = *reinterpret_cast<const uint32_t*>(scale_src + 4);
        scale = scales.resolve(LoadedScale{scale, (word >> (8 * (code & 3))) & 0xFFu});
      }
      const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
      if constexpr (kInt8) {  // output chunk q: columns 8 q + [0, 8), words 2 q and 2 q + 1
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const uint32_t lo = int8_bias(words[2 * q]), hi = int8_bias(words[2 * q + 1]);
          *reinterpret_cast<uint4*>(decoded + swizzle(c / kParts, (c % kParts) * 2 + q, kRowChunks)) =
              make_uint4(decode_int8_row_pair<T>(lo, 0, scale), decode_int8_row_pair<T>(lo, 1, scale),
                         decode_int8_row_pair<T>(hi, 0, scale), decode_int8_row_pair<T>(hi, 1, scale));
        }
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          uint32_t v[4];
#pragma unroll
          for (int b = 0; b < 4; ++b) v[b] = decode_byte<T>(pair_table, words[q], b, lane_offset, scale);
          *reinterpret_cast<uint4*>(decoded + swizzle(c / kParts, (c % kParts) * 4 + q, kRowChunks)) =
              make_uint4(v[0], v[1], v[2], v[3]);
        }
      }
    }
  };

  float acc[S::MI][S::NI][4] = {};
  auto compute = [&](int slot) {
    const uint32_t a_base = smem_addr(stages + slot * kStageBytes);
    const uint32_t b_base = smem_addr(decoded);
#pragma unroll
    for (int ks = 0; ks < kTileK / 16; ++ks) {
      uint32_t a[S::MI][4];
      load_a_fragments<T, S>(a, a_base, ks, ct);
#pragma unroll
      for (int nj = 0; nj < S::NI / 2; ++nj) {
        uint32_t r[4];  // (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
        ldmatrix_x4<true>(r, b_base + swizzle(ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                              (wn0 + nj * 16) / 8 + (lane >> 4), kRowChunks));
#pragma unroll
        for (int mi = 0; mi < S::MI; ++mi) {
          mma_16816<T>(acc[mi][2 * nj], a[mi], r[0], r[1]);
          mma_16816<T>(acc[mi][2 * nj + 1], a[mi], r[2], r[3]);
        }
      }
    }
  };

  const int64_t k_tiles = K / kTileK;
#pragma unroll
  for (int s = 0; s < S::kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s * kTileK);
    cp_async_commit();
  }
  // kScaleRegs: the scales of k-tile kt + 1 are loaded before k-tile kt is decoded, so that a
  // k-tile's decode and mma hide their latency.
  [[maybe_unused]] ChunkScales current, following;
  if constexpr (kScaleRegs) load_scales(current, 0);
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<S::kStages - 2>();
    __syncthreads();  // k-tile kt landed; everyone is done with `decoded` and slot kt - 1
    const int64_t next = kt + S::kStages - 1;
    if (next < k_tiles) load_stage(static_cast<int>(next % S::kStages), next * kTileK);
    cp_async_commit();
    if constexpr (kScaleRegs) {
      following = current;
      if (kt + 1 < k_tiles) load_scales(following, (kt + 1) * kTileK);
    }
    decode(static_cast<int>(kt % S::kStages), kt * kTileK, kScaleRegs ? &current : nullptr);
    __syncthreads();
    compute(static_cast<int>(kt % S::kStages));
    if constexpr (kScaleRegs) current = following;
  }
  store_tile<T, S>(acc, ct, out, N);
}

template <typename T, class S, bool kDoubleQuant, bool kInt8>
__global__ void __launch_bounds__(S::kThreads)
nf4_gemm_kn_kernel(const T* __restrict__ in, T* __restrict__ out, const uint8_t* __restrict__ packed,
                   const __grid_constant__ Quant4Args args, const RowTile* __restrict__ tiles, int64_t N, int64_t K,
                   int n_tiles, int log2_blocksize) {
  nf4_gemm_kn<T, S, kDoubleQuant, kInt8, false>(in, out, packed, args, tiles, N, K, n_tiles, log2_blocksize);
}

// 4-bit scales through registers: at least two CTAs per SM, as the shared memory allows for
// every tile height. The bound only binds Tile128Kn (256 threads: at most 128 registers;
// uncapped, double quant takes 129-164 depending on the loop, and one CTA per SM).
template <typename T, class S, bool kDoubleQuant>
__global__ void __launch_bounds__(S::kThreads, 2)
nf4_gemm_kn_regs_kernel(const T* __restrict__ in, T* __restrict__ out, const uint8_t* __restrict__ packed,
                        const __grid_constant__ Quant4Args args, const RowTile* __restrict__ tiles, int64_t N,
                        int64_t K, int n_tiles, int log2_blocksize) {
  nf4_gemm_kn<T, S, kDoubleQuant, false, true>(in, out, packed, args, tiles, N, K, n_tiles, log2_blocksize);
}

// Row-tile heights. Short tiles keep CTAs from multiplying padding when experts get a handful of
// rows (decode, T <= 256); tall ones reuse each decoded weight across more rows when they get
// hundreds.
using Tile16 = TileShape<16, 1, 4, 32>;
using Tile32 = TileShape<32, 1, 4, 32>;
using Tile64 = TileShape<64, 1, 4, 32>;
// 128 rows: the [N, K] kernel decodes in registers per warp column, so its warps stay side by
// side (each weight decoded once); the [K, N] kernel decodes once through shared memory whatever
// the warp layout, so its warps form 2 x 4 tiles of 64 x 32, which halves the ldmatrix reads of
// the input rows per mma; a ring of 3 stages (113 KB of shared memory) lets two CTAs share an SM.
// H100, deepseek_v3 T=4096, two products each: [N, K] 14.2 ms side by side vs 14.9 ms in 2 x 4;
// [K, N] 15.6 ms side by side, 14.1 ms in 2 x 4 with 4 stages, 11.4 ms with 3.
using Tile128Nk = TileShape<128, 1, 8, 16>;
using Tile128Kn = TileShape<128, 2, 4, 32, 3>;
static_assert(Tile16::BN == 128 && Tile32::BN == 128 && Tile64::BN == 128 && Tile128Nk::BN == 128 &&
                  Tile128Kn::BN == 128,
              "launch_plan sizes a list's grid with 128 output columns a CTA");
static_assert(nf4_wgmma_height_supported(16) && nf4_wgmma_height_supported(32) && nf4_wgmma_height_supported(64) &&
              nf4_wgmma_height_supported(128) && kNumTileHeights == 4,
              "the wgmma kernel takes every height of the plan (experts_tile_plan.h)");

template <typename T>
using GemmKernel = void (*)(const T*, T*, const uint8_t*, const Quant4Args, const RowTile*, int64_t, int64_t, int,
                            int);

template <typename T, class S, bool kNK, bool kDoubleQuant, bool kInt8>
void launch(const at::Tensor& in, at::Tensor& out, const uint8_t* packed, const Quant4Args& args,
            const RowTile* tiles, int64_t num_tiles, int64_t N, int64_t K, int log2_blocksize) {
  const int64_t n_tiles = (N + S::BN - 1) / S::BN;
  const int64_t ctas = num_tiles * n_tiles;
  TORCH_CHECK(ctas < (int64_t{1} << 31), "moequant: fused 4-bit GEMM grid too large (", num_str(ctas), " CTAs)");
  // Dynamic shared memory (the decode tables are static): the nk kernel's ring of input rows.
  int smem = 0;
  GemmKernel<T> kernel = nullptr;
  if constexpr (kNK) {
    kernel = nf4_gemm_nk_kernel<T, S, kDoubleQuant, kInt8>;
    smem = S::kStages * S::kSmemA;
  } else if constexpr (!kInt8) {
    if (kn_scales_in_registers(kDoubleQuant, S::BM)) {
      kernel = nf4_gemm_kn_regs_kernel<T, S, kDoubleQuant>;
      smem = KnSmem<S, kDoubleQuant, false, true>::kBytes;
    } else {
      kernel = nf4_gemm_kn_kernel<T, S, kDoubleQuant, false>;
      smem = KnSmem<S, kDoubleQuant, false, false>::kBytes;
    }
  } else {
    kernel = nf4_gemm_kn_kernel<T, S, kDoubleQuant, kInt8>;
    smem = KnSmem<S, kDoubleQuant, kInt8>::kBytes;
  }
  allow_dynamic_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(ctas), S::kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(in.const_data_ptr()), reinterpret_cast<T*>(out.mutable_data_ptr()), packed, args,
      tiles, N, K, static_cast<int>(n_tiles), log2_blocksize);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether a product's row tiles of `height` rows run on a wgmma kernel (Hopper,
// experts_nf4_wgmma.cu) rather than mma.sync: the [N, K] products where the kernel's 32-bit
// indexing holds the expert's matrix; the 4-bit [K, N] products of at least
// nf4_wgmma_kn_min_height() rows (int8 ones never: that kernel decodes 4-bit chunks only). One
// rule for the launch and for the fused kernel's row bound (nf4_grouped_gemm_applies).
bool runs_on_wgmma(bool int8, bool transpose_stored, int64_t N, int64_t K, int height) {
  if (transpose_stored) return nf4_wgmma_nk_enabled() && nf4_wgmma_nk_indexes(N, K);
  const int min_height = int8 ? 0 : nf4_wgmma_kn_min_height();
  return min_height > 0 && height >= min_height;
}

// One launch per tile height in use, tallest first; they write disjoint rows of `out`. With
// `concurrent`, a list after the first whose grid is less than a wave (two CTAs per SM) runs on a
// pool stream forked from the current one and joined back before returning: the lists of a
// decode-once plan follow each expert's own rows, and a few short lists one after the other would
// each leave most SMs idle (mixtral-8x7b T=256: 96- and 160-CTA lists for the 4096-wide
// products). Lists of a wave or more stay in order on the current stream, as before (deepseek-v3
// T=4096 ran 3% slower with its large remainder lists side by side). Which lists run on wgmma:
// runs_on_wgmma.
template <typename T, bool kDoubleQuant, bool kInt8>
void launch_plan(const at::Tensor& in, at::Tensor& out, const PackedStack& w, const TilePlan& plan, int64_t N,
                 int64_t K, bool transpose_stored, bool concurrent) {
  const int64_t num_tiles = static_cast<int64_t>(plan.tiles.size());
  at::Tensor pinned = at::empty({num_tiles * 4}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  std::memcpy(pinned.mutable_data_ptr<int32_t>(), plan.tiles.data(), num_tiles * sizeof(RowTile));
  const at::Tensor tiles_dev = pinned.to(in.device(), /*non_blocking=*/true);
  const RowTile* tiles = reinterpret_cast<const RowTile*>(tiles_dev.const_data_ptr<int32_t>());
  // int8 ignores the blocksize (one scale per stored row).
  const int log2_blocksize = kInt8 ? 0 : __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const QuantStackView view = w.view();
  const Quant4Args args{view.scales, view.codebook, view.type};
  const uint8_t* packed = static_cast<const uint8_t*>(view.data);
  auto launch_list = [&](int h) {
    const int64_t first = plan.begin[h], count = plan.count(h);
    if (runs_on_wgmma(kInt8, transpose_stored, N, K, kTileHeights[h])) {  // experts_nf4_wgmma.cu
      if (transpose_stored) {
        launch_nf4_wgmma_nk<T>(in, out, packed, args, tiles + first, count, kTileHeights[h], N, K, log2_blocksize);
      } else {
        launch_nf4_wgmma_kn<T>(in, out, packed, args, tiles + first, count, kTileHeights[h], N, K, log2_blocksize);
      }
      return;
    }
    auto go = [&](auto nk_shape, auto kn_shape) {
      if (transpose_stored) {
        launch<T, decltype(nk_shape), true, kDoubleQuant, kInt8>(in, out, packed, args, tiles + first, count, N,
                                                                 K, log2_blocksize);
      } else {
        launch<T, decltype(kn_shape), false, kDoubleQuant, kInt8>(in, out, packed, args, tiles + first, count, N,
                                                                  K, log2_blocksize);
      }
    };
    switch (kTileHeights[h]) {
      case 16: go(Tile16{}, Tile16{}); break;
      case 32: go(Tile32{}, Tile32{}); break;
      case 64: go(Tile64{}, Tile64{}); break;
      default: go(Tile128Nk{}, Tile128Kn{});
    }
  };
  std::vector<int> lists;
  for (int h = kNumTileHeights - 1; h >= 0; --h) {
    if (plan.count(h) > 0) lists.push_back(h);
  }
  // Every fused kernel's CTA covers 128 output columns (static_asserts above and in
  // experts_nf4_wgmma.cu).
  const int64_t wave = 2 * int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount};
  auto on_side_stream = [&](size_t i) {
    return concurrent && i > 0 && plan.count(lists[i]) * ((N + 127) / 128) < wave;
  };
  const c10::cuda::CUDAStream current = at::cuda::getCurrentCUDAStream();
  std::optional<at::cuda::CUDAEvent> forked;  // before the first launch: the side lists never wait for it
  for (size_t i = 0; i < lists.size(); ++i) {
    if (on_side_stream(i) && !forked.has_value()) {
      forked.emplace();
      forked->record(current);
    }
  }
  for (size_t i = 0; i < lists.size(); ++i) {
    if (!on_side_stream(i)) {
      launch_list(lists[i]);
      continue;
    }
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, current.device_index());
    forked->block(side);
    {
      const c10::cuda::CUDAStreamGuard on_side(side);
      launch_list(lists[i]);
    }
    at::cuda::CUDAEvent done;
    done.record(side);
    done.block(current);
  }
}

// MOEQUANT_EXPERTS_FUSED_GEMM: "0" never, "1" whenever the shapes allow, unset: by rows per expert.
int fused_gemm_mode() {
  const char* v = std::getenv("MOEQUANT_EXPERTS_FUSED_GEMM");
  if (v == nullptr || *v == '\0') return -1;
  return std::strcmp(v, "0") == 0 ? 0 : 1;
}

// MOEQUANT_INT8_FUSED_GEMM="0" keeps int8 stacks on the scratch rung (for comparison in
// benchmarks); read once per process. Default: int8 takes the fused kernels as 4-bit does.
bool int8_fused_gemm_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("MOEQUANT_INT8_FUSED_GEMM");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// Up to this many rows per active expert (mean) the fused kernel beats dequant scratch + cuBLAS.
// fwd+bwd vs bf16 grouped_mm, deepseek_v3 T=4096 (128 rows): H100 1.03x fused vs 1.30x with
// scratch; H200 1.19x either way. At 256 rows (qwen3 T=4096) scratch is ahead (H200 0.97x vs
// 1.02x), and at 512 (olmoe T=4096) clearly (0.86x vs 1.00x).
constexpr int64_t kFusedMaxMeanRows = 128;
// The [N, K] products on Hopper (wgmma, experts_nf4_wgmma.cu) win further: H200, forward under
// no_grad against scratch + grouped_mm (bench_experts --compare-rungs, ratios to bf16): 128 rows
// (deepseek_v3 T=4096) 0.93x vs 1.32x, 256 (qwen3 T=4096) 0.83x vs 0.95x. Where the crossover
// lies depends on the shape (cuBLAS gains more from large matrices): at 512 rows olmoe T=4096 is
// 0.76x vs 0.84x but deepseek_v3 T=16384 1.18x vs 0.88x; at 1024, qwen3 0.78x vs 0.59x.
// The [K, N] products take the same bound where their 128-row tiles run on wgmma: H200, same
// build, qwen3 T=4096 fwd+bwd 0.79x (scratch) vs 0.745x (fused), with LoRA 1.035x vs 0.995x.
constexpr int64_t kWgmmaMaxMeanRows = 256;

}  // namespace

bool nf4_grouped_gemm_applies(const at::Tensor& in, const PackedStack& w, bool transpose_stored,
                              const ExpertsRouting& r) {
  const int mode = fused_gemm_mode();
  if (mode == 0 || r.num_rows == 0) return false;
  if (w.type == QuantType::kInt8 && !int8_fused_gemm_enabled()) return false;
  if (in.scalar_type() != at::kBFloat16 && in.scalar_type() != at::kHalf) return false;
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;  // mma.sync bf16, cp.async
  const int64_t K = transpose_stored ? w.cols : w.rows, N = transpose_stored ? w.rows : w.cols;
  if (K % kTileK != 0 || N % kChunkWeights != 0) return false;
  if (r.num_rows > std::numeric_limits<int32_t>::max()) return false;
  if (mode == 1) return true;
  const int64_t active = static_cast<int64_t>(r.active_experts.size());
  const bool int8 = w.type == QuantType::kInt8;
  const int64_t max_mean_rows =
      runs_on_wgmma(int8, transpose_stored, N, K, kTallestTile) ? kWgmmaMaxMeanRows : kFusedMaxMeanRows;
  return r.num_rows <= max_mean_rows * active;
}

void nf4_grouped_gemm(const at::Tensor& in, at::Tensor& out, const PackedStack& w, bool transpose_stored,
                      const ExpertsRouting& r) {
  const int64_t K = transpose_stored ? w.cols : w.rows, N = transpose_stored ? w.rows : w.cols;
  TORCH_CHECK(K % kTileK == 0 && N % kChunkWeights == 0,
              "moequant: fused GEMM needs K % 64 == 0 and N % 32 == 0, got K ", num_str(K), ", N ", num_str(N));
  TORCH_CHECK(!(w.type == QuantType::kInt8 && w.double_quant()), "moequant: int8 stacks have no double quant");
  const at::Tensor x = contiguous_aligned16(in);
  const TilePlanRule rule = tile_plan_rule_from_env();
  const TilePlan plan = plan_row_tiles(r.row_offsets, r.active_experts, rule);
  const bool concurrent = rule == TilePlanRule::kDecodeOnce;
  auto go = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (w.type == QuantType::kInt8) launch_plan<T, false, true>(x, out, w, plan, N, K, transpose_stored, concurrent);
    else if (w.double_quant()) launch_plan<T, true, false>(x, out, w, plan, N, K, transpose_stored, concurrent);
    else launch_plan<T, false, false>(x, out, w, plan, N, K, transpose_stored, concurrent);
  };
  AT_DISPATCH_SWITCH(in.scalar_type(), "moequant_nf4_grouped_gemm",
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { go(__nv_bfloat16{}); })
                         AT_DISPATCH_CASE(at::kHalf, [&] { go(__half{}); }));
}

}  // namespace moequant
