// Fused grouped GEMM (4-bit formats and int8), stored [N, K] orientation (the forward of the
// standard layout, the input gradient of the transposed one), on Hopper: per row tile of one
// expert, out^T = S_e · in^T with S_e decoded on the fly. The stored [K, N] orientation
// (nf4_gemm_kn_wgmma_kernel: 4-bit formats, 128-row tiles unless MOEQUANT_KN_WGMMA chooses other
// heights) is further down: there the decoded weights are wgmma's shared-memory operand.
//
// The mma.sync kernel (experts_nf4_gemm.cu) multiplies the rows of `in` (A, from shared memory)
// by decoded weights (B, registers); each warp re-reads the whole row tile from shared memory for
// its 16 weight columns, and that traffic bounds it (ncu, H100 deepseek_v3 T=4096: 73% L1/shared,
// 18% DRAM). Here the roles swap: the weights are wgmma's A operand, decoded by each thread
// straight into its register fragments, and the rows of `in` are the B operand, which the tensor
// cores read from a 128-byte-swizzled shared-memory ring. A CTA of two warpgroups owns 128 output
// features x kRows routing-order rows; each warpgroup decodes its own 64 features (every weight is
// decoded once per CTA) and issues m64n<kRows>k16 wgmma, decoding step s + 1 while step s runs.
// Weights are decoded exactly as dequant_expert rounds them (any 4-bit codebook, plain or
// double-quantized block scales); each output is summed by one accumulator in a fixed order
// (deterministic).
//
// Fragment slots: thread (g, q) = (lane / 4, lane % 4) of warp w holds, for each k16 step s of a
// k-tile, k-pairs q and q + 4 of features 16 w + g and 16 w + g + 8. The kernel lets those slots
// stand for input elements 32 P + 8 s + 4 h + {2 b, 2 b + 1} (P = q / 2, b = q % 2, h = 0 for pair
// q and 1 for pair q + 4), so that a thread's 16 weights of a k-tile are the bytes of parity b in
// 16-byte half P of its feature row's 32 packed bytes: one 16-byte load and one byte permute per
// row. The rows of `in` get the same permutation as they land in shared memory (8-byte cp.async):
// physical 4-element chunk c of a k-tile goes to 16-byte unit c % 8, half c / 8, of its row. Sums
// over k do not care about the order.
//
// int8 stacks (kInt8) keep those slots, hence the same permutation of `in`: the thread's 16
// weights of a k-tile are the 32 code bytes [32 P, 32 P + 32) of its feature row (two 16-byte
// loads), of which it takes the byte pairs of parity b. Step s reads 16-byte half s / 2; its words
// 2 (s % 2) and 2 (s % 2) + 1 hold elements 32 P + 8 s + [0, 4) and + [4, 8), and bytes 2 b, 2 b + 1
// of each are the pair of slot h = 0 (pair q) and h = 1 (pair q + 4). One scale per feature row,
// loaded once for the whole K loop.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "../error_text.h"
#include "cuda_utils.cuh"
#include "experts_nf4_wgmma.cuh"
#include "wgmma.cuh"

namespace moequant {
namespace {

constexpr int kTileK = kNF4GemmTileK;

// Row pitch of the fp32 epilogue tile (store_tile_fp32): 16 bytes of padding, so that a warp's
// stores of four rows land in distinct banks.
constexpr int kFp32OutPitch(int bn) { return bn * 4 + 16; }

// Shared address of a kernel's dynamic shared memory, declared __align__(1024): the 128-byte
// swizzle atoms of the ring need 1024-byte alignment, and the launchers budget no slack for
// aligning it by hand (1 KB a CTA more breaks the carveout fit asserted after WgmmaTileShape).
// A base the compiler did not align stops the kernel instead of corrupting it.
__device__ __forceinline__ uint32_t aligned_ring_addr(const uint8_t* dynamic_smem) {
  const uint32_t addr = smem_addr(dynamic_smem);
  if (addr % 1024u != 0) __trap();
  return addr;
}

template <int kRows_>
struct WgmmaTileShape {
  static constexpr int kRows = kRows_;             // routing-order rows per CTA: the wgmma N
  static constexpr int kGroups = 2;                // warpgroups, 64 output features each
  static constexpr int BN = 64 * kGroups;          // output features per CTA
  static constexpr int kThreads = 128 * kGroups;
  // Ring of k-tiles of `in`. A stage is refilled two k-tiles after the one that last read it:
  // by then every warpgroup has retired that k-tile's wgmma (each keeps one group in flight).
  static constexpr int kStages = 4, kLookahead = kStages - 2;
  static constexpr int kStageBytes = kRows * kTileK * 2;  // 128 bytes a row
  static constexpr int kAcc = kRows / 2;                  // fp32 accumulators per thread
  static constexpr int kCopiesPerThread = kRows * 16 / kThreads;  // 8-byte copies of a stage
  static constexpr int kSmemBytes = kStages * kStageBytes;  // the ring, 1024-byte aligned (aligned_ring_addr)
  // Epilogue: the tile goes through shared memory as [kRows][BN] (rows padded by 16 bytes so that
  // a warp's 2-byte stores of four rows land in four bank groups), then out in 16-byte stores.
  static constexpr int kOutPitch = BN * 2 + 16;
  // With the fp32 epilogue the tile needs 16 bytes a row more than the ring holds.
  static constexpr int kSmemBytesFp32 =
      kStages * kStageBytes > kRows * kFp32OutPitch(BN) ? kStages * kStageBytes : kRows * kFp32OutPitch(BN);
  static_assert(kRows * 16 % kThreads == 0, "every thread copies the same number of chunks");
  static_assert(BN == 128, "launch_plan (experts_nf4_gemm.cu) sizes a list's grid with 128 columns a CTA");
  static_assert(kRows * kOutPitch <= kStages * kStageBytes, "the epilogue tile fits in the ring");
};

// Two 128-row CTAs, decode tables included (plain or double quant) and 1 KB each reserved by the
// driver, fill the 196 KB shared-memory carveout; a byte more takes the 228 KB one, with less L1
// beside it, where the kernel ran about 40% slower (H200 ncu: L1 hit rate 4.4% -> 0.1%, eligible
// warps per scheduler 0.95 -> 0.69; deepseek-v3 T=4096 forward 11.9 -> 15.3 ms).
static_assert(2 * (WgmmaTileShape<128>::kSmemBytes + sizeof(DecodeTables<true>) + 1024) <= 196 * 1024,
              "two 128-row CTAs fit the 196 KB carveout");

// MOEQUANT_WGMMA_FP32_EPILOGUE=1 (read once per process): the [N, K] kernel's output tile leaves
// through store_tile_fp32, as the [K, N] kernel's always does.
bool nf4_wgmma_fp32_epilogue() {
  static const bool on = [] {
    const char* v = std::getenv("MOEQUANT_WGMMA_FP32_EPILOGUE");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

// Stores a CTA's output tile [kRows routing-order rows][BN features] from the wgmma accumulators
// (thread (g, q) of warp w: accumulator i is feature row `feature` (+ 8 for i % 4 >= 2), routing
// row 8 (i / 4) + 2 q + i % 2) through `staging` in shared memory as fp32, rounding on the way
// out in 16-byte stores. Converting the accumulator registers themselves makes ptxas serialize
// every wgmma of the kernel (C7514: "non wgmma instructions reading accumulator registers").
// The caller has retired every wgmma and synchronized the CTA before `staging` is reused.
template <typename T, int kRows, int BN, int kThreads, int kAcc>
__device__ __forceinline__ void store_tile_fp32(const float (&acc)[kAcc], uint8_t* staging, int feature, int q,
                                                T* out, int64_t row_begin, int rows, int64_t n0, int64_t N) {
  constexpr int kPitch = kFp32OutPitch(BN);
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int r = 8 * (i / 4) + 2 * q + i % 2, f = feature + 8 * (i % 4 / 2);
    *reinterpret_cast<float*>(staging + r * kPitch + f * 4) = acc[i];
  }
  __syncthreads();
  constexpr int kOutChunks = kRows * BN / 8;
#pragma unroll
  for (int i = 0; i < (kOutChunks + kThreads - 1) / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads, r = c / (BN / 8), ch = c % (BN / 8);
    const int64_t col = n0 + ch * 8;
    if (c < kOutChunks && r < rows && col < N) {
      const float4 lo = *reinterpret_cast<const float4*>(staging + r * kPitch + ch * 32);
      const float4 hi = *reinterpret_cast<const float4*>(staging + r * kPitch + ch * 32 + 16);
      *reinterpret_cast<uint4*>(out + (row_begin + r) * N + col) =
          make_uint4(pack2<T>(lo.x, lo.y), pack2<T>(lo.z, lo.w), pack2<T>(hi.x, hi.y), pack2<T>(hi.z, hi.w));
    }
  }
}

// kFp32Epilogue: the output tile leaves through store_tile_fp32 (no wgmma serialization;
// MOEQUANT_WGMMA_FP32_EPILOGUE=1, opt-in until measured), else rounded in registers.
// kInt8: an int8 row-wise stack (see the header comment for its slots), else 4-bit codes.
template <typename T, class S, bool kDoubleQuant, bool kFp32Epilogue, bool kInt8>
__global__ void __launch_bounds__(S::kThreads, 2)
nf4_gemm_nk_wgmma_kernel(const T* __restrict__ in, T* __restrict__ out, const uint8_t* __restrict__ packed,
                         const __grid_constant__ Quant4Args args, const RowTile* __restrict__ tiles, int64_t N,
                         int64_t K, int n_tiles, int log2_blocksize) {
#if MOEQUANT_WGMMA_COMPILED
  extern __shared__ __align__(1024) uint8_t staging[];  // the ring; then the epilogue tile
  __shared__ DecodeTables<kDoubleQuant, kInt8> tables;
  tables.fill(args.codebook);
  const float2* const pair_table = tables.pair;
  const uint32_t ring = aligned_ring_addr(staging);

  const RowTile tile = tiles[blockIdx.x / n_tiles];
  const MatrixScales<kDoubleQuant> scales(args.scales, tile.expert, tables.map);
  const int64_t n0 = int64_t{blockIdx.x % n_tiles} * S::BN;
  const int rows = min(S::kRows, tile.row_end - tile.row_begin);
  const T* const in_rows = in + int64_t{tile.row_begin} * K;
  const int tid = threadIdx.x, lane = tid % 32, q = lane % 4;
  const uint32_t lane_offset = lane_table_copy_offset();

  // Rows of `in`: copy i of this thread moves physical chunk c = tid % 16 of row tid / 16 + 16 i;
  // rows 16 apart share their swizzle (it depends on the row mod 8), so the offset within a row
  // is set up once. Rows past the tile's end are zero-filled.
  const int chunk = tid % 16, row_first = tid / 16;
  const uint32_t dst_in_row = swizzle(row_first & 7, chunk % 8, 8) - (row_first & 7) * 128 + (chunk / 8) * 8;
  auto load_stage = [&](int slot, int64_t k0) {
    const uint32_t stage = ring + slot * S::kStageBytes;
#pragma unroll
    for (int i = 0; i < S::kCopiesPerThread; ++i) {
      const int r = row_first + 16 * i;
      const bool valid = r < rows;
      cp_async8(stage + r * 128 + dst_in_row, valid ? in_rows + int64_t{r} * K + k0 + 4 * chunk : in, valid);
    }
  };

  // This thread's two feature rows (of the CTA's 128: warpgroup, warp, lane / 4; and + 8), as the
  // element of k = 32 P in each within the expert's matrix: 32 bits (the launcher keeps matrices
  // of 2^32 elements or more off this kernel), so each k-tile's code and scale offsets cost 32-bit
  // adds and shifts. row_valid: the feature is below N (else decoded as zeros and never stored).
  const int feature = tid / 128 * 64 + tid / 32 % 4 * 16 + lane / 4;
  uint32_t row_elem[2];
  bool row_valid[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + feature + 8 * h;
    row_valid[h] = n < N;
    row_elem[h] = row_valid[h] ? static_cast<uint32_t>(n * K + 32 * (q / 2)) : 0u;
  }
  const uint8_t* const expert_packed = packed + code_bytes<kInt8>(int64_t{tile.expert} * N * K);
  // Double quant: the four threads of a quad (q = 0..3) hold the same two feature rows, threads
  // q and q ^ 1 the same 32-element range, so each block scale is needed by two or four threads.
  // Each thread loads and decodes one, that of row h = q % 2 in its own range, and takes the
  // other from its partner (resolve_scales): half the scale loads and map decodes per k-tile.
  const int own_row = q % 2;
  const uint32_t own_elem = own_row ? row_elem[1] : row_elem[0];
  const bool own_valid = own_row ? row_valid[1] : row_valid[0];
  constexpr int kLoadedScales = kDoubleQuant ? 1 : 2;
  // Per feature row: 4-bit, the 16 packed bytes of the 32-element range and its block scale
  // (double quant: the one scale this thread decodes); int8, the 32 code bytes of the range (the
  // row's scale is the same for every k: row_scale).
  struct Codes {
    uint4 bytes[2][kInt8 ? 2 : 1];
    LoadedScale scale[kLoadedScales];
  };
  // A thread's 16 weights of a row lie in one 32-element range, hence in one NF4 block (B >= 32).
  auto load_codes = [&](Codes& c, uint32_t k0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < (kInt8 ? 2 : 1); ++i) c.bytes[h][i] = make_uint4(0, 0, 0, 0);
      if constexpr (!kDoubleQuant) c.scale[h] = LoadedScale{0.0f, 0u};
      if (row_valid[h]) {
        const uint32_t elem = row_elem[h] + k0;
        if constexpr (kInt8) {
          c.bytes[h][0] = load_packed16(expert_packed + elem);
          c.bytes[h][1] = load_packed16(expert_packed + elem + 16);
        } else {
          c.bytes[h][0] = load_packed16(expert_packed + elem / 2);
          if constexpr (!kDoubleQuant) c.scale[h] = scales.load(elem >> log2_blocksize);
        }
      }
    }
    if constexpr (kDoubleQuant) {
      c.scale[0] = own_valid ? scales.load((own_elem + k0) >> log2_blocksize) : LoadedScale{0.0f, 0u};
    }
  };
  // int8: the scale of each feature row, for the whole K loop (0 past N: those rows decode as 0).
  float row_scale[2] = {0.0f, 0.0f};
  if constexpr (kInt8) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (row_valid[h]) row_scale[h] = scales.load(n0 + feature + 8 * h).value;
    }
  }
  // The block scales of the thread's two rows for a k-tile's codes. Double quant: the quad's
  // threads (q & 2) and (q & 2) + 1 decoded those of rows 0 and 1 in this thread's range.
  auto resolve_scales = [&](const Codes& c, float (&amax)[2]) {
    if constexpr (kInt8) {
      amax[0] = row_scale[0];
      amax[1] = row_scale[1];
    } else if constexpr (kDoubleQuant) {
      const float own = scales.resolve(c.scale[0]);
      const int first = (lane & ~3) | (q & 2);
      amax[0] = __shfl_sync(0xffffffffu, own, first);
      amax[1] = __shfl_sync(0xffffffffu, own, first | 1);
    } else {
      amax[0] = scales.resolve(c.scale[0]);
      amax[1] = scales.resolve(c.scale[1]);
    }
  };
  // A fragments of step s. 4-bit: byte i = 2 s + h of the thread's 8 (parity q % 2 of its 16) per
  // row. int8: words 2 (s % 2) and 2 (s % 2) + 1 of 16-byte half s / 2 hold elements 8 s + [0, 4)
  // and 8 s + [4, 8) of the range; their code pairs of parity q % 2 are slots h = 0 and h = 1.
  const uint32_t parity_select = q % 2 ? 0x7531u : 0x6420u;
  const uint32_t pair_select = q % 2 ? 0x7632u : 0x5410u;
  auto decode_step = [&](uint32_t (&a)[4], const Codes& c, const float (&amax)[2], int s) {
    uint32_t word[2];
    if constexpr (kInt8) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4& v = c.bytes[h][s / 2];
        word[h] = int8_bias(s % 2 ? __byte_perm(v.z, v.w, pair_select) : __byte_perm(v.x, v.y, pair_select));
      }
      a[0] = decode_int8_row_pair<T>(word[0], 0, amax[0]);  // feature g, pair q
      a[1] = decode_int8_row_pair<T>(word[1], 0, amax[1]);  // feature g + 8
      a[2] = decode_int8_row_pair<T>(word[0], 1, amax[0]);  // pair q + 4
      a[3] = decode_int8_row_pair<T>(word[1], 1, amax[1]);
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        word[h] = s < 2 ? __byte_perm(c.bytes[h][0].x, c.bytes[h][0].y, parity_select)
                        : __byte_perm(c.bytes[h][0].z, c.bytes[h][0].w, parity_select);
      }
      a[0] = decode_byte<T>(pair_table, word[0], (2 * s) % 4, lane_offset, amax[0]);      // feature g, pair q
      a[1] = decode_byte<T>(pair_table, word[1], (2 * s) % 4, lane_offset, amax[1]);      // feature g + 8
      a[2] = decode_byte<T>(pair_table, word[0], (2 * s + 1) % 4, lane_offset, amax[0]);  // pair q + 4
      a[3] = decode_byte<T>(pair_table, word[1], (2 * s + 1) % 4, lane_offset, amax[1]);
    }
  };

  float acc[S::kAcc];
#pragma unroll
  for (int i = 0; i < S::kAcc; ++i) acc[i] = 0.0f;
  const int64_t k_tiles = K / kTileK;
#pragma unroll
  for (int s = 0; s < S::kLookahead; ++s) {
    if (s < k_tiles) load_stage(s, s * kTileK);
    cp_async_commit();
  }
  // Packed codes: two register sets, each reloaded two k-tiles ahead once decoded.
  Codes codes[2];
  load_codes(codes[0], 0);
  if (k_tiles > 1) load_codes(codes[1], kTileK);
  uint32_t a[2][4];  // A fragments, double-buffered: step s decodes while step s - 1 multiplies
  for (int64_t kt = 0; kt < k_tiles; kt += 2) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t t = kt + u;
      if (t < k_tiles) {
        cp_async_wait<S::kLookahead - 1>();
        fence_proxy_async_shared();  // this thread's copies of k-tile t, to the tensor cores
        wgmma_wait<1>();             // this thread's wgmma up to k-tile t - 1, step 2, retired
        __syncthreads();             // everyone's: k-tile t is visible, slot t + kLookahead free
        const int64_t next = t + S::kLookahead;
        if (next < k_tiles) load_stage(static_cast<int>(next % S::kStages), next * kTileK);
        cp_async_commit();
        const uint64_t desc = wgmma_desc_k_major_sw128(ring + static_cast<uint32_t>(t % S::kStages) * S::kStageBytes);
        float amax[2];
        resolve_scales(codes[u], amax);
#pragma unroll
        for (int s = 0; s < kTileK / 16; ++s) {
          if (s > 0) wgmma_wait<1>();  // step s - 2, the last reader of a[s % 2], retired
          decode_step(a[s % 2], codes[u], amax, s);
          wgmma_fence();
          wgmma_fence_operands(acc);
          WgmmaRs<S::kRows>::template run<T>(acc, a[s % 2], desc + 2 * s);  // + 32 bytes a step
          wgmma_commit();
          wgmma_fence_operands(acc);
        }
        if (t + 2 < k_tiles) load_codes(codes[u], static_cast<uint32_t>((t + 2) * kTileK));
      }
    }
  }
  wgmma_wait<0>();
  wgmma_fence_operands(acc);

  // Accumulator i of thread (g, q): feature row g (+ 8 for i % 4 >= 2), routing row
  // 8 (i / 4) + 2 q + i % 2.
  __syncthreads();  // every warpgroup is done with the ring
  if constexpr (kFp32Epilogue) {
    store_tile_fp32<T, S::kRows, S::BN, S::kThreads>(acc, staging, feature, q, out, tile.row_begin, rows, n0, N);
  } else {
#pragma unroll
    for (int i = 0; i < S::kAcc; ++i) {
      const int r = 8 * (i / 4) + 2 * q + i % 2, f = feature + 8 * (i % 4 / 2);
      *reinterpret_cast<T*>(staging + r * S::kOutPitch + f * 2) = from_float<T>(acc[i]);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < S::kCopiesPerThread; ++i) {
      const int c = tid + i * S::kThreads, r = c / 16, ch = c % 16;
      const int64_t col = n0 + ch * 8;
      if (r < rows && col < N) {
        *reinterpret_cast<uint4*>(out + (int64_t{tile.row_begin} + r) * N + col) =
            *reinterpret_cast<const uint4*>(staging + r * S::kOutPitch + ch * 16);
      }
    }
  }
#else
  __trap();  // launched only where nf4_wgmma_nk_enabled(): an sm_90a build on an sm_90 device
#endif
}

// Launches a wgmma GEMM kernel on its grid: one CTA per (row tile, `bn` output features).
template <typename T, class Kernel>
void launch_tiles(Kernel kernel, int bn, int threads, int smem, const at::Tensor& in, at::Tensor& out,
                  const uint8_t* packed, const Quant4Args& args, const RowTile* tiles, int64_t num_tiles, int64_t N,
                  int64_t K, int log2_blocksize) {
  const int64_t n_tiles = (N + bn - 1) / bn;
  const int64_t ctas = num_tiles * n_tiles;
  TORCH_CHECK(ctas < (int64_t{1} << 31), "moequant: fused 4-bit GEMM grid too large (", num_str(ctas), " CTAs)");
  allow_dynamic_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(ctas), threads, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(in.const_data_ptr()), reinterpret_cast<T*>(out.mutable_data_ptr()), packed, args,
      tiles, N, K, static_cast<int>(n_tiles), log2_blocksize);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kRows>
void launch_height(const at::Tensor& in, at::Tensor& out, const uint8_t* packed, const Quant4Args& args,
                   const RowTile* tiles, int64_t num_tiles, int64_t N, int64_t K, int log2_blocksize) {
  using S = WgmmaTileShape<kRows>;
  auto go = [&](auto kernel, int smem) {
    launch_tiles<T>(kernel, S::BN, S::kThreads, smem, in, out, packed, args, tiles, num_tiles, N, K, log2_blocksize);
  };
  const bool dq = args.scales.double_quant();
  if (args.type == QuantType::kInt8) {
    if (nf4_wgmma_fp32_epilogue()) go(nf4_gemm_nk_wgmma_kernel<T, S, false, true, true>, S::kSmemBytesFp32);
    else go(nf4_gemm_nk_wgmma_kernel<T, S, false, false, true>, S::kSmemBytes);
  } else if (nf4_wgmma_fp32_epilogue()) {
    if (dq) go(nf4_gemm_nk_wgmma_kernel<T, S, true, true, false>, S::kSmemBytesFp32);
    else go(nf4_gemm_nk_wgmma_kernel<T, S, false, true, false>, S::kSmemBytesFp32);
  } else {
    if (dq) go(nf4_gemm_nk_wgmma_kernel<T, S, true, false, false>, S::kSmemBytes);
    else go(nf4_gemm_nk_wgmma_kernel<T, S, false, false, false>, S::kSmemBytes);
  }
}


// The [K, N] product (stored S_e = [K, N]: weight rows are input features, the input gradient of
// the standard layout): out^T = S_e^T · in^T. A stored row holds consecutive output features of
// one k, so a thread cannot gather a register fragment (two k of one feature) from one packed
// byte; instead each thread decodes one 32-feature chunk of one k row per k-tile (16 packed bytes,
// one block scale) into a decoded tile in shared memory, [64 k][64 features] per warpgroup, rows
// of 128 bytes with the 128-byte swizzle: exactly wgmma's MN-major layout, so the tile is the A
// operand as written (transpose bit set), with no ldmatrix and no register fragments. The rows of
// `in` are the B operand, K-major, in the same kind of cp.async ring as the [N, K] kernel (natural
// k order here, 16-byte copies). A CTA of two warpgroups owns 128 output features x kRows rows;
// each warpgroup decodes the 64 features its own wgmma reads (every weight decoded once per CTA).
// The decoded tile alternates between two buffers: each iteration first retires its wgmma up to
// k-tile t - 2 (the last reader of buffer t % 2 and of the ring slot refilled in this iteration),
// then decodes k-tile t while the wgmma of t - 1 runs.
template <int kRows_>
struct WgmmaKnTileShape {
  static constexpr int kRows = kRows_;   // routing-order rows per CTA: the wgmma N
  static constexpr int kGroups = 2;      // warpgroups, 64 output features each
  static constexpr int BN = 64 * kGroups;
  static constexpr int kThreads = 128 * kGroups;
  // Ring of k-tiles of `in`, refilled kStages - kLookahead = 2 k-tiles after its last reader (as
  // in WgmmaTileShape). Three stages and two decoded buffers keep two CTAs on an SM at 128 rows
  // (113 KB each with the decode tables, 114 KB with double quant; with three buffers, 129 KB:
  // one CTA) and fit two 64-row CTAs into the 196 KB carveout (89 KB each).
  static constexpr int kStages = kRows >= 64 ? 3 : 4, kLookahead = kStages - 2;
  static constexpr int kStageBytes = kRows * kTileK * 2;
  static constexpr int kGroupDecodedBytes = kTileK * 64 * 2;          // one warpgroup's [64 k][64]
  static constexpr int kDecodedBytes = kGroups * kGroupDecodedBytes;  // one buffer
  static constexpr int kDecodedBuffers = 2;
  static constexpr int kAcc = kRows / 2;
  static constexpr int kInChunks = kRows * 8;  // 16-byte copies of a stage
  static constexpr int kCopiesPerThread = (kInChunks + kThreads - 1) / kThreads;
  static constexpr int kRingBytes = kStages * kStageBytes + kDecodedBuffers * kDecodedBytes;
  static constexpr int kSmemBytes = kRingBytes;  // 1024-byte aligned (aligned_ring_addr)
  static constexpr int kOutPitch = kFp32OutPitch(BN);  // epilogue: store_tile_fp32
  static_assert(kTileK * kGroups * 2 == kThreads, "each thread decodes one 32-feature chunk per k-tile");
  static_assert(BN == 128, "launch_plan (experts_nf4_gemm.cu) sizes a list's grid with 128 columns a CTA");
  static_assert(kRows * kOutPitch <= kRingBytes, "the epilogue tile fits in the ring");
};

// Two 128-row CTAs share an SM (two decoded buffers; with three, one CTA fits).
static_assert(2 * (WgmmaKnTileShape<128>::kSmemBytes + sizeof(DecodeTables<true>) + 1024) <= 228 * 1024,
              "two 128-row [K, N] CTAs fit the 228 KB carveout");

template <typename T, class S, bool kDoubleQuant>
__global__ void __launch_bounds__(S::kThreads, 2)
nf4_gemm_kn_wgmma_kernel(const T* __restrict__ in, T* __restrict__ out, const uint8_t* __restrict__ packed,
                         const __grid_constant__ Quant4Args args, const RowTile* __restrict__ tiles, int64_t N,
                         int64_t K, int n_tiles, int log2_blocksize) {
#if MOEQUANT_WGMMA_COMPILED
  extern __shared__ __align__(1024) uint8_t staging[];  // ring of `in`, decoded buffers; then the epilogue tile
  __shared__ DecodeTables<kDoubleQuant> tables;
  tables.fill(args.codebook);
  const float2* const pair_table = tables.pair;
  const uint32_t ring = aligned_ring_addr(staging);
  const uint32_t decoded = ring + S::kStages * S::kStageBytes;
  uint8_t* const decoded_ptr = staging + S::kStages * S::kStageBytes;

  const RowTile tile = tiles[blockIdx.x / n_tiles];
  const MatrixScales<kDoubleQuant> scales(args.scales, tile.expert, tables.map);
  const int64_t n0 = int64_t{blockIdx.x % n_tiles} * S::BN;
  const int rows = min(S::kRows, tile.row_end - tile.row_begin);
  const T* const in_rows = in + int64_t{tile.row_begin} * K;
  const int tid = threadIdx.x, lane = tid % 32, group = tid / 128;
  const uint32_t lane_offset = lane_table_copy_offset();

  // Rows of `in`, K-major: 16-byte chunk c of row r to swizzle(r, c % 8). Rows past the tile's end
  // are zero-filled.
  auto load_stage = [&](int slot, int64_t k0) {
    const uint32_t stage = ring + slot * S::kStageBytes;
#pragma unroll
    for (int i = 0; i < S::kCopiesPerThread; ++i) {
      const int c = tid + i * S::kThreads;
      if (S::kInChunks % S::kThreads == 0 || c < S::kInChunks) {
        const int r = c / 8, ch = c % 8;
        const bool valid = r < rows;
        cp_async16(stage + swizzle(r, ch, 8), valid ? in_rows + int64_t{r} * K + k0 + ch * 8 : in, valid);
      }
    }
  };

  // This thread's chunk of each k-tile: k row dk = (tid % 128) / 2, features 64 group + 32 half
  // (half = tid % 2) of the CTA's 128, stored at element dk * N + feature of the k-tile's first row.
  // Thread pairs read one 32-byte sector; the 8 threads of a quarter warp write 8 distinct 16-byte
  // bank groups (4 k rows x 2 halves, chunks 4 half + j xor dk % 8).
  const int dk = tid % 128 / 2, half = tid % 2;
  const int64_t chunk_feature = n0 + 64 * group + 32 * half;
  const bool chunk_valid = chunk_feature < N;  // N % 32 == 0: a chunk is all in or all out
  const int64_t chunk_elem = int64_t{dk} * N + chunk_feature;  // within the expert's matrix
  const uint8_t* const expert_packed = packed + int64_t{tile.expert} * N * K / 2;
  const uint32_t chunk_dst = group * S::kGroupDecodedBytes + dk * 128;
  struct Codes {
    uint4 bytes;
    LoadedScale scale;
  };
  // 32 features of one k lie in one block (B >= 32, chunks 32-aligned).
  auto load_codes = [&](Codes& c, int64_t k0) {
    c.bytes = make_uint4(0, 0, 0, 0);
    c.scale = LoadedScale{0.0f, 0u};
    if (chunk_valid) {
      const int64_t elem = chunk_elem + k0 * N;
      c.bytes = load_packed16(expert_packed + elem / 2);
      c.scale = scales.load(elem >> log2_blocksize);
    }
  };
  // Features past N decode as zeros (absmax 0): their outputs are never stored.
  auto decode = [&](const Codes& c, int buffer) {
    const float amax = scales.resolve(c.scale);
    const uint32_t words[4] = {c.bytes.x, c.bytes.y, c.bytes.z, c.bytes.w};
    uint8_t* const dst = decoded_ptr + buffer * S::kDecodedBytes + chunk_dst;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t v[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) v[b] = decode_byte<T>(pair_table, words[j], b, lane_offset, amax);
      *reinterpret_cast<uint4*>(dst + ((4 * half + j) ^ (dk & 7)) * 16) = make_uint4(v[0], v[1], v[2], v[3]);
    }
  };

  float acc[S::kAcc];
#pragma unroll
  for (int i = 0; i < S::kAcc; ++i) acc[i] = 0.0f;
  const int64_t k_tiles = K / kTileK;
#pragma unroll
  for (int s = 0; s < S::kLookahead; ++s) {
    if (s < k_tiles) load_stage(s, s * kTileK);
    cp_async_commit();
  }
  // Packed codes of k-tiles t (decoded now) and t + 1; loads run two k-tiles ahead. One k-tile per
  // iteration, straight-line.
  Codes codes, codes_next{};
  load_codes(codes, 0);
  if (k_tiles > 1) load_codes(codes_next, kTileK);
  __syncthreads();  // the decode tables
  for (int64_t t = 0; t < k_tiles; ++t) {
    const int buffer = static_cast<int>(t % S::kDecodedBuffers);
    wgmma_wait<1>();        // this warpgroup's wgmma up to k-tile t - 2 retired: its buffer is free
    decode(codes, buffer);  // while k-tile t - 1's wgmma runs
    codes = codes_next;
    if (t + 2 < k_tiles) load_codes(codes_next, (t + 2) * kTileK);
    cp_async_wait<S::kLookahead - 1>();
    fence_proxy_async_shared();  // this thread's decoded chunk and copies of k-tile t, to the tensor cores
    __syncthreads();             // k-tile t decoded and landed; every wgmma of t - 2 retired (slot free)
    const int64_t next = t + S::kLookahead;
    if (next < k_tiles) load_stage(static_cast<int>(next % S::kStages), next * kTileK);
    cp_async_commit();
    const uint64_t desc_b = wgmma_desc_k_major_sw128(ring + static_cast<uint32_t>(t % S::kStages) * S::kStageBytes);
    const uint64_t desc_a = wgmma_desc_mn_major_sw128(
        decoded + buffer * S::kDecodedBytes + group * S::kGroupDecodedBytes, S::kGroupDecodedBytes);
    // No operand fences around the wgmma: the accumulators are only touched by the wgmma
    // statements (their "+f" operands order them) until the final wait.
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < kTileK / 16; ++s) {
      // + 16 k rows (2048 bytes) of A and + 32 bytes of B per k16 step
      WgmmaSsTransA<S::kRows>::template run<T>(acc, desc_a + (2048 >> 4) * s, desc_b + 2 * s);
    }
    wgmma_commit();
  }
  wgmma_wait<0>();
  wgmma_fence_operands(acc);

  // Accumulator i of thread (g, q): feature row g (+ 8 for i % 4 >= 2) of the warp's 16, routing
  // row 8 (i / 4) + 2 q + i % 2 (as in the [N, K] kernel).
  const int q = lane % 4;
  const int feature = group * 64 + tid / 32 % 4 * 16 + lane / 4;
  __syncthreads();  // every warpgroup is done with the ring and the decoded buffers
  store_tile_fp32<T, S::kRows, S::BN, S::kThreads>(acc, staging, feature, q, out, tile.row_begin, rows, n0, N);
#else
  __trap();  // launched only where nf4_wgmma_kn_min_height() > 0: an sm_90a build on an sm_90 device
#endif
}

template <typename T, int kRows>
void launch_kn_height(const at::Tensor& in, at::Tensor& out, const uint8_t* packed, const Quant4Args& args,
                      const RowTile* tiles, int64_t num_tiles, int64_t N, int64_t K, int log2_blocksize) {
  using S = WgmmaKnTileShape<kRows>;
  auto go = [&](auto kernel) {
    launch_tiles<T>(kernel, S::BN, S::kThreads, S::kSmemBytes, in, out, packed, args, tiles, num_tiles, N, K,
                    log2_blocksize);
  };
  if (args.scales.double_quant()) go(nf4_gemm_kn_wgmma_kernel<T, S, true>);
  else go(nf4_gemm_kn_wgmma_kernel<T, S, false>);
}

}  // namespace

bool nf4_wgmma_nk_enabled() {
#ifdef MOEQUANT_HAS_SM90A
  const char* v = std::getenv("MOEQUANT_EXPERTS_WGMMA");
  if (v != nullptr && std::strcmp(v, "0") == 0) return false;
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  return p->major == 9 && p->minor == 0;
#else
  return false;
#endif
}

int nf4_wgmma_kn_min_height() {
  static const int requested = [] {
    const char* v = std::getenv("MOEQUANT_KN_WGMMA");
    // Default: 128-row lists only. H200, one call, fwd+bwd kernels: mixtral-8x7b T=256 3.71 ->
    // 3.42 ms, deepseek-v3 T=4096 27.0 -> 26.1 ms; with 64-row lists too, 3.54 and 25.9 ms; at 16
    // rows wgmma lost (deepseek-v3 T=256 12.0 -> 13.0 ms with every height).
    if (v == nullptr || *v == '\0') return kTallestTile;
    if (std::strcmp(v, "0") == 0) return 0;
    if (std::strcmp(v, "1") == 0) return 1;
    for (int h : kTileHeights) {
      if (std::to_string(h) == v) return h;
    }
    TORCH_CHECK(false, "moequant: MOEQUANT_KN_WGMMA must be 0, 1 or a row-tile height (16, 32, 64, 128); got '",
                v, "'");
  }();
  return requested > 0 && nf4_wgmma_nk_enabled() ? requested : 0;
}

// Calls launch(std::integral_constant<int, h>) for the row-tile height h the kernels are built for
// (nf4_wgmma_height_supported); `what` names the product in the error for any other height.
template <class Launch>
void with_tile_height(int height, const char* what, Launch&& launch) {
  switch (height) {
    case 16: return launch(std::integral_constant<int, 16>{});
    case 32: return launch(std::integral_constant<int, 32>{});
    case 64: return launch(std::integral_constant<int, 64>{});
    case 128: return launch(std::integral_constant<int, 128>{});
    default: TORCH_CHECK(false, "moequant: no wgmma ", what, " for row tiles of ", num_str(height));
  }
}

template <typename T>
void launch_nf4_wgmma_nk(const at::Tensor& in, at::Tensor& out, const uint8_t* packed, const Quant4Args& args,
                         const RowTile* tiles, int64_t num_tiles, int height, int64_t N, int64_t K,
                         int log2_blocksize) {
  TORCH_CHECK(K % kTileK == 0 && N % 8 == 0 && (args.type == QuantType::kInt8 || log2_blocksize >= 5),
              "moequant: the wgmma fused GEMM needs K % 64 == 0, N % 8 == 0 and (4-bit) blocksize >= 32");
  TORCH_CHECK(nf4_wgmma_nk_indexes(N, K), "moequant: the wgmma fused GEMM indexes an expert's matrix in 32 bits; got ",
              num_str(N), " x ", num_str(K), " elements");
  with_tile_height(height, "4-bit GEMM", [&](auto rows) {
    launch_height<T, decltype(rows)::value>(in, out, packed, args, tiles, num_tiles, N, K, log2_blocksize);
  });
}

template void launch_nf4_wgmma_nk<__nv_bfloat16>(const at::Tensor&, at::Tensor&, const uint8_t*, const Quant4Args&,
                                                 const RowTile*, int64_t, int, int64_t, int64_t, int);
template void launch_nf4_wgmma_nk<__half>(const at::Tensor&, at::Tensor&, const uint8_t*, const Quant4Args&,
                                          const RowTile*, int64_t, int, int64_t, int64_t, int);

template <typename T>
void launch_nf4_wgmma_kn(const at::Tensor& in, at::Tensor& out, const uint8_t* packed, const Quant4Args& args,
                         const RowTile* tiles, int64_t num_tiles, int height, int64_t N, int64_t K,
                         int log2_blocksize) {
  TORCH_CHECK(K % kTileK == 0 && N % kChunkWeights == 0 && log2_blocksize >= 5 && is_4bit(args.type),
              "moequant: the wgmma 4-bit [K, N] GEMM needs a 4-bit stack, K % 64 == 0, N % 32 == 0 and blocksize >= 32");
  with_tile_height(height, "4-bit [K, N] GEMM", [&](auto rows) {
    launch_kn_height<T, decltype(rows)::value>(in, out, packed, args, tiles, num_tiles, N, K, log2_blocksize);
  });
}

template void launch_nf4_wgmma_kn<__nv_bfloat16>(const at::Tensor&, at::Tensor&, const uint8_t*, const Quant4Args&,
                                                 const RowTile*, int64_t, int, int64_t, int64_t, int);
template void launch_nf4_wgmma_kn<__half>(const at::Tensor&, at::Tensor&, const uint8_t*, const Quant4Args&,
                                          const RowTile*, int64_t, int, int64_t, int64_t, int);

}  // namespace moequant
