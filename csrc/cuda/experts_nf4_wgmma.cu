// Fused NF4 grouped GEMM, stored [N, K] orientation (the forward of the standard layout, the input
// gradient of the transposed one), on Hopper: per row tile of one expert, out^T = S_e · in^T with
// S_e decoded on the fly.
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
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <cstring>

#include "../error_text.h"
#include "cuda_utils.cuh"
#include "experts_nf4_wgmma.cuh"
#include "wgmma.cuh"

namespace moequant {
namespace {

constexpr int kTileK = kNF4GemmTileK;

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
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + aligning the ring to 1024 B
  // Epilogue: the tile goes through shared memory as [kRows][BN] (rows padded by 16 bytes so that
  // a warp's 2-byte stores of four rows land in four bank groups), then out in 16-byte stores.
  static constexpr int kOutPitch = BN * 2 + 16;
  static_assert(kRows * 16 % kThreads == 0, "every thread copies the same number of chunks");
  static_assert(kRows * kOutPitch <= kStages * kStageBytes, "the epilogue tile fits in the ring");
};

// 16 packed bytes, read once (no L1 allocation).
__device__ __forceinline__ uint4 load_packed16(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <typename T, class S, bool kDoubleQuant>
__global__ void __launch_bounds__(S::kThreads, 2)
nf4_gemm_nk_wgmma_kernel(const T* __restrict__ in, T* __restrict__ out, const uint8_t* __restrict__ packed,
                         const __grid_constant__ Quant4Args args, const RowTile* __restrict__ tiles, int64_t N,
                         int64_t K, int n_tiles, int log2_blocksize) {
#if MOEQUANT_WGMMA_COMPILED
  extern __shared__ uint8_t smem_raw[];  // the ring, once aligned; then the epilogue tile
  __shared__ DecodeTables<kDoubleQuant> tables;
  tables.fill(args.codebook);
  const float2* const pair_table = tables.pair;
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t ring = (raw + 1023u) & ~1023u;  // the swizzle atoms need 1024-byte alignment
  uint8_t* const staging = smem_raw + (ring - raw);

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
  // stack element of k = 32 P in each (-1: a feature past N, decoded as zeros and never stored).
  const int feature = tid / 128 * 64 + tid / 32 % 4 * 16 + lane / 4;
  int64_t row_elem[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + feature + 8 * h;
    row_elem[h] = n < N ? n * K + 32 * (q / 2) : -1;  // within the expert's matrix
  }
  const uint8_t* const expert_packed = packed + int64_t{tile.expert} * N * K / 2;
  struct Codes {
    uint4 bytes[2];
    LoadedScale scale[2];
  };
  // A thread's 16 weights of a row lie in one 32-element range, hence in one NF4 block (B >= 32).
  auto load_codes = [&](Codes& c, int64_t k0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      c.bytes[h] = make_uint4(0, 0, 0, 0);
      c.scale[h] = LoadedScale{0.0f, 0u};
      if (row_elem[h] >= 0) {
        const int64_t elem = row_elem[h] + k0;
        c.bytes[h] = load_packed16(expert_packed + elem / 2);
        c.scale[h] = scales.load(elem >> log2_blocksize);
      }
    }
  };
  // A fragments of step s: byte i = 2 s + h of the thread's 8 (parity q % 2 of its 16) per row.
  const uint32_t parity_select = q % 2 ? 0x7531u : 0x6420u;
  auto decode_step = [&](uint32_t (&a)[4], const Codes& c, const float (&amax)[2], int s) {
    uint32_t word[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      word[h] = s < 2 ? __byte_perm(c.bytes[h].x, c.bytes[h].y, parity_select)
                      : __byte_perm(c.bytes[h].z, c.bytes[h].w, parity_select);
    }
    a[0] = decode_byte<T>(pair_table, word[0], (2 * s) % 4, lane_offset, amax[0]);      // feature g, pair q
    a[1] = decode_byte<T>(pair_table, word[1], (2 * s) % 4, lane_offset, amax[1]);      // feature g + 8
    a[2] = decode_byte<T>(pair_table, word[0], (2 * s + 1) % 4, lane_offset, amax[0]);  // pair q + 4
    a[3] = decode_byte<T>(pair_table, word[1], (2 * s + 1) % 4, lane_offset, amax[1]);
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
        const float amax[2] = {scales.resolve(codes[u].scale[0]), scales.resolve(codes[u].scale[1])};
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
        if (t + 2 < k_tiles) load_codes(codes[u], (t + 2) * kTileK);
      }
    }
  }
  wgmma_wait<0>();
  wgmma_fence_operands(acc);

  // Accumulator i of thread (g, q): feature row g (+ 8 for i % 4 >= 2), routing row
  // 8 (i / 4) + 2 q + i % 2.
  __syncthreads();  // every warpgroup is done with the ring
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
#else
  __trap();  // launched only where nf4_wgmma_nk_enabled(): an sm_90a build on an sm_90 device
#endif
}

template <typename T, int kRows>
void launch_height(const at::Tensor& in, at::Tensor& out, const uint8_t* packed, const Quant4Args& args,
                   const RowTile* tiles, int64_t num_tiles, int64_t N, int64_t K, int log2_blocksize) {
  using S = WgmmaTileShape<kRows>;
  const int64_t n_tiles = (N + S::BN - 1) / S::BN;
  const int64_t ctas = num_tiles * n_tiles;
  TORCH_CHECK(ctas < (int64_t{1} << 31), "moequant: fused 4-bit GEMM grid too large (", num_str(ctas), " CTAs)");
  auto go = [&](auto kernel) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes));
    kernel<<<static_cast<unsigned>(ctas), S::kThreads, S::kSmemBytes, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(in.const_data_ptr()), reinterpret_cast<T*>(out.mutable_data_ptr()), packed, args,
        tiles, N, K, static_cast<int>(n_tiles), log2_blocksize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (args.scales.double_quant()) go(nf4_gemm_nk_wgmma_kernel<T, S, true>);
  else go(nf4_gemm_nk_wgmma_kernel<T, S, false>);
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

template <typename T>
void launch_nf4_wgmma_nk(const at::Tensor& in, at::Tensor& out, const uint8_t* packed, const Quant4Args& args,
                         const RowTile* tiles, int64_t num_tiles, int height, int64_t N, int64_t K,
                         int log2_blocksize) {
  TORCH_CHECK(K % kTileK == 0 && N % 8 == 0 && log2_blocksize >= 5,
              "moequant: the wgmma 4-bit GEMM needs K % 64 == 0, N % 8 == 0 and blocksize >= 32");
  switch (height) {
    case 16: return launch_height<T, 16>(in, out, packed, args, tiles, num_tiles, N, K, log2_blocksize);
    case 32: return launch_height<T, 32>(in, out, packed, args, tiles, num_tiles, N, K, log2_blocksize);
    case 64: return launch_height<T, 64>(in, out, packed, args, tiles, num_tiles, N, K, log2_blocksize);
    case 128: return launch_height<T, 128>(in, out, packed, args, tiles, num_tiles, N, K, log2_blocksize);
    default: TORCH_CHECK(false, "moequant: no wgmma 4-bit GEMM for row tiles of ", num_str(height));
  }
}

template void launch_nf4_wgmma_nk<__nv_bfloat16>(const at::Tensor&, at::Tensor&, const uint8_t*, const Quant4Args&,
                                                 const RowTile*, int64_t, int, int64_t, int64_t, int);
template void launch_nf4_wgmma_nk<__half>(const at::Tensor&, at::Tensor&, const uint8_t*, const Quant4Args&,
                                          const RowTile*, int64_t, int, int64_t, int64_t, int);

}  // namespace moequant
