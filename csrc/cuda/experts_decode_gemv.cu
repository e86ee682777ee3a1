// Decode GEMV. Launch 1: h[s, p] = W_gu[e][:, K-split s] x[t] (fp32 partial sums) for every pair
// p = (t, j) and split s of the input dimension. Launch 2: y[s, p] = W_d[e][:, split s] act(h[p] +
// b_gu[e]), with the split sums of h and the activation fused into the load of the input vector.
// Launch 3: out[t] = sum_j w[t, j] (sum_s y[s, p] + b_d[e]) in slot order. Splitting K keeps
// enough CTAs in flight when one expert's rows are few (mixtral's down projection: 4096 rows of
// 14336) and bounds the staged input vector to a few KB, so that occupancy does not depend on K.
// A warp owns kRowsPerWarp output rows of its split; each lane decodes units of 32 weights (16
// bytes of 4-bit codes, or 32 bytes of int8 codes: the only step that differs by format) of
// those rows, all loads of a step in flight before the first decode, and multiplies with the
// input vector staged in shared memory, padded by 4 floats every 32 so that the 16-byte reads of
// lanes with different units hit different banks. 4-bit codes decode two at a time through a
// byte-pair table in shared memory, whose lookups bound the kernel when it is fully occupied
// (shared-memory wavefronts, not instruction issue); decode_half_table() opts in to half2 entries
// on 16-bit inputs (one wavefront per warp lookup instead of two; the codes rounded to fp16).
// On 16-bit inputs with 4-bit codes in blocks of 64+ and rows of whole 256-weight steps, the
// products run on tensor cores instead (gemv_mma_applies): the codes reach shared memory through
// a per-warp cp.async ring, each lookup reads one 32-bit entry (two codes in the input dtype, an
// mma.sync A-fragment register: half the wavefronts of the float2 entries, no conversions), the
// multiply-adds leave the FMA pipe, and each 64 weights' fp32 sum takes its block scale.
// Sums run in a fixed order: results are reproducible. With LoRA, a small kernel beside each GEMV
// computes the A product u = A[e] in[p] for every pair (lora_a_kernel: the GEMV's dependent, it
// reads the GEMV's input as soon as the GEMV has waited for it and runs while the GEMV does), and
// another after both adds the B product scaling * B[e][row] . u to split 0 of the GEMV's sums
// (lora_b_kernel, a thread per row): no LoRA work between a GEMV's weight loads. The
// factors are read as given (float32 or the input dtype, B with any strides) and rounded to the
// input dtype as they are read. On sm_90+ every kernel is a programmatic dependent launch: it
// starts while its predecessor drains, does what does not depend on it (the decode table; after
// the first kernel, also the expert ids and its weights' first step), and only then waits for the
// predecessor's results (griddepcontrol.wait), so the
// per-kernel fixed costs overlap; the first kernel's predecessor is the stream's previous kernel
// (the router's, or the previous layer's combine). No host synchronization anywhere: the path can
// be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

#include "experts_common.cuh"
#include "experts_decode_gemv.cuh"
#include "experts_nf4_tiles.cuh"
#include "quant_decode.cuh"

namespace moequant {

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kRowsPerWarp = 4;
constexpr int64_t kDefaultDecodeMaxPairs = 64;
constexpr int64_t kMaxGridZ = 65535;  // the GEMV grid's z dimension, one index per pair
// Input-dimension split: about 64 units (2048 weights) per row and split, two steps per row tile.
constexpr int64_t kSplitUnits = 64;
constexpr int kPaddedUnitFloats = 36;  // 32 inputs + 4 floats of padding per unit in shared memory
constexpr int kStagedPerThread = kSplitUnits * 32 / kGemvThreads;
constexpr int kRowsPerCta = kGemvWarps * kRowsPerWarp;
// Tensor-core decode (gemv_mma_applies): a CTA tile's rows as kMmaRowGroups groups of 16 (an
// mma.sync m16n8k16 A operand), each group's split input range divided among kMmaKParts warps
// (so that the tile's 32 rows keep the balance of the FFMA path's tiles over the grid), in steps
// of 8 units (256 weights) a warp; the parts' row sums meet in shared memory once per tile.
constexpr int kMmaRowGroups = kRowsPerCta / 16;
constexpr int kMmaKParts = kGemvWarps / kMmaRowGroups;
// A warp's steps reach shared memory through a ring of stages (cp.async, 16-byte pieces: four full
// rows per copy instruction), stages - 1 steps ahead of the one decoded. Three stages at two CTAs
// per SM, or two at three where that takes fewer rounds of row tiles (gemv_mma_stages). The rings
// follow the input vector, staged in the 16-bit input dtype.
constexpr int kMmaStepUnits = 8;  // 256 weights: 128 bytes of a row
constexpr int kMmaStageBytes = 16 * kMmaStepUnits * 16;
constexpr int kMmaStagedBytes = static_cast<int>(kSplitUnits * 32 * 2);
constexpr int mma_smem_bytes(int stages) { return kMmaStagedBytes + kGemvWarps * stages * kMmaStageBytes; }
static_assert(kRowsPerCta % 16 == 0 && kGemvWarps % kMmaRowGroups == 0, "whole m16 row groups, whole warps a group");
// CUDA_KERNEL_ASSERT_MSG prints this as the failed assertion (with file, line, block and thread).
#define MOEQUANT_NEGATIVE_EXPERT_ID_MSG \
  "moequant.experts_forward: top_k_index holds a negative expert id; ids must be in [0, E) (or >= E for sentinel " \
  "slots that contribute zero)"
#ifndef CUDA_KERNEL_ASSERT_MSG  // older torch: the condition alone is printed
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

// Programmatic dependent launch, device side (sm_90+; no-ops elsewhere and in a kernel launched
// without the attribute). Every kernel of the chain waits on every path, early exits included, so
// that its completion implies its predecessors' (later kernels rely on it transitively).
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_kernel_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launches `kernel`, as a programmatic dependent launch of the stream's previous kernel when
// `dependent` (the kernel then calls wait_for_previous_kernel before reading its results).
template <typename... KernelArgs, typename... Args>
static void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, int threads, int smem, cudaStream_t stream,
                          bool dependent, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// Which of the call's kernels are programmatic dependent launches (sm_90+). `chain`: every kernel
// after the first, on its predecessor in the call. `first`: the first kernel too, on the stream's
// previous kernel (the router's, or the previous layer's combine, which lets it launch early): it
// fills its table while that kernel drains and reads the routing only after waiting for it.
// MOEQUANT_DECODE_PDL switches for comparisons and tests: "0" none, "chain" the chain only.
struct DecodeLaunches {
  bool chain = false, first = false;
};

// Where a GEMV waits for its predecessor and lets the next kernel launch. kChained: it triggers at
// once, and reads the expert ids and issues its first weight loads before its wait. kFirst: the
// call's first kernel (its predecessor may have written the routing): only the table before the
// wait, the trigger after it. kBeforeLora: as kChained, but the trigger after the wait, for the
// LoRA A product launched as its dependent, which reads the same input without waiting.
enum class GemvStart : int { kChained, kFirst, kBeforeLora };

static DecodeLaunches decode_launches() {
  const char* v = std::getenv("MOEQUANT_DECODE_PDL");
  const std::string mode = v == nullptr ? "" : v;
  if (mode == "0" || at::cuda::getCurrentDeviceProperties()->major < 9) return {};
  return {true, mode != "chain"};
}

bool decode_gemv_applies(int64_t num_pairs, bool transposed, const PackedStack& gate_up, const PackedStack& down) {
  int64_t max_pairs = kDefaultDecodeMaxPairs;
  if (const char* v = std::getenv("MOEQUANT_DECODE_MAX_PAIRS")) max_pairs = std::atoll(v);
  // Inside a CUDA graph capture the GEMV is the only path that can run (the routed path reads its
  // row counts on the host): it takes every call its grid can hold (one z index per pair).
  if (num_pairs > max_pairs && max_pairs > 0 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    max_pairs = kMaxGridZ;
  }
  if (num_pairs == 0 || num_pairs > max_pairs || transposed) return false;
  // Rows must be whole 16-byte units (32 weights), and the GEMV indexes the units of one expert's
  // matrix in 32 bits.
  auto fits = [](const PackedStack& w) { return w.cols % 32 == 0 && w.rows * (w.cols / 32) < (int64_t{1} << 31); };
  return fits(gate_up) && fits(down);
}

// How the input dimension K is split: `splits` ranges of `units` 16-byte units each (the last
// may be shorter). A warp step covers 32 units of a row, so whole multiples of 32 per split keep
// every lane loading (deepseek_v3's gate_up input, 224 units: 64+64+64+32 instead of 4 x 56, whose
// second steps left a quarter of the lanes idle); never more than kSplitUnits per split.
struct GemvSplit {
  int64_t splits, units;
};

GemvSplit gemv_split(int64_t K) {
  const int64_t units_per_row = K / 32;
  const int64_t even = std::max<int64_t>(1, (units_per_row + kSplitUnits - 1) / kSplitUnits);
  const int64_t units = std::max<int64_t>(32, ((units_per_row + even - 1) / even + 31) / 32 * 32);  // <= kSplitUnits
  return {std::max<int64_t>(1, (units_per_row + units - 1) / units), units};
}
static_assert(kSplitUnits % 32 == 0, "gemv_split rounds split sizes up to whole warp steps");

// Input vector element c of the pair: either the token's hidden state, or act(h + bias).
template <typename in_t, bool kActInput, GatedActivation kAct>
struct GemvInput {
  const in_t* hidden;      // [T, K]
  const float* gate_up;    // [S, P, 2K] split partial sums (kActInput)
  int64_t gate_up_splits;  // S
  const float* bias;       // [E, 2K] or null (kActInput)
  bool interleaved;
  float alpha, limit;
};

template <GatedActivation kAct>
__device__ __forceinline__ float gated_value(float g, float u, float alpha, float limit) {
  if constexpr (kAct == GatedActivation::kSilu) {
    return g / (1.0f + expf(-g)) * u;
  } else if constexpr (kAct == GatedActivation::kGelu) {
    return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f)) * u;
  } else if constexpr (kAct == GatedActivation::kGeluTanh) {
    const float t = tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g));
    return 0.5f * g * (1.0f + t) * u;
  } else {
    const float gc = g > limit ? limit : g;
    const float uc = u > limit ? limit : (u < -limit ? -limit : u);
    return (uc + 1.0f) * (gc / (1.0f + expf(-alpha * gc)));
  }
}

// The staged input value of element c of the pair's input vector.
template <typename in_t, bool kActInput, GatedActivation kAct>
__device__ __forceinline__ float gemv_input(const GemvInput<in_t, kActInput, kAct>& in, int64_t c, int64_t K,
                                            int64_t p, int64_t P, int64_t e, int64_t top_k) {
  if constexpr (kActInput) {
    const int64_t gi = in.interleaved ? 2 * c : c, ui = in.interleaved ? 2 * c + 1 : K + c;
    float g = 0.0f, u = 0.0f;
    for (int64_t hs = 0; hs < in.gate_up_splits; ++hs) {  // fixed order: reproducible
      const float* h = in.gate_up + (hs * P + p) * 2 * K;
      g += h[gi];
      u += h[ui];
    }
    if (in.bias != nullptr) {
      g += in.bias[e * 2 * K + gi];
      u += in.bias[e * 2 * K + ui];
    }
    return gated_value<kAct>(g, u, in.alpha, in.limit);
  } else {
    return to_float(in.hidden[(p / top_k) * K + c]);
  }
}

// One projection's LoRA A product (lora_a_kernel): u[p, q, c] = A[e][q, chunk c] . in[p], partial
// sums over chunks of the input. A [E, rank, K] contiguous and 16-byte aligned, in the input dtype or
// float32 (a_float).
struct LoraA {
  const void* A = nullptr;
  bool a_float = false;
  int64_t rank = 0;
  float* u_parts = nullptr;
};

// One projection's LoRA B product (lora_b_kernel): scaling * B[e][row, :] . u[p], u the sum of the A
// product's parts in order, rounded to the input dtype as the routed path's product in the factors'
// dtype is. B [E, N, rank] with any strides (PEFT's is an expert-minor view), in the input dtype or
// float32 (b_float).
struct LoraB {
  const float* u_parts = nullptr;  // [P, rank, parts]
  int64_t parts = 0;
  const void* B = nullptr;
  int64_t b_stride[3] = {0, 0, 0};  // elements, for (expert, row, rank)
  bool b_float = false;
  int64_t rank = 0;
  float scaling = 1.0f;
};

// A LoRA factor element as the routed path uses it: in the input dtype. Float32 factors (PEFT
// keeps adapters in float32 by default) are rounded here as they are read, which gives the values
// a conversion copy would, without converting every expert's factors for the few a call reads.
template <typename in_t, typename factor_t>
__device__ __forceinline__ float factor_value(factor_t v) {
  if constexpr (std::is_same_v<factor_t, in_t>) {
    return to_float(v);
  } else {
    return to_float(from_float<in_t>(to_float(v)));
  }
}

// The A product of one projection's LoRA for every pair: u[p, q, chunk] = A[e][q, chunk] . in[p]
// over chunks of kLoraChunk input elements (grid: chunks x pairs). It runs beside the projection's
// GEMV, launched as its dependent: the GEMV lets it launch once the input is there (its own wait is
// over), so it reads the input at once and waits for the GEMV only at its end (its completion must
// imply its predecessors'). The chunk of the input is staged rounded to the input dtype (for down,
// act(h + b_gu) recomputed from the gate_up splits, in the dtype as the routed path feeds its LoRA);
// a warp per rank row, each lane multiplying groups of 8 elements (16 or 32 bytes of factors; the
// same elements and order for float32 and 16-bit factors, so that float32 factors give bitwise
// what converted ones do), the lanes summed in a fixed order: reproducible.
constexpr int kLoraChunk = 1024;

template <typename in_t, typename factor_t>
__device__ __forceinline__ float lora_a_row_chunk(const factor_t* row, const float* xs, int n, int lane) {
  constexpr int kGroup = 8;  // n is a multiple of 32
  constexpr int kLoads = kGroup * sizeof(factor_t) / 16;
  constexpr int kUnroll = kLoads == 1 ? 4 : 2;  // 64 bytes in flight a lane
  float acc = 0.0f;
#pragma unroll kUnroll
  for (int i = 0; i < kLoraChunk / kGroup / 32; ++i) {
    const int group = lane + 32 * i;
    if (group * kGroup < n) {
      uint4 bits[kLoads];
#pragma unroll
      for (int l = 0; l < kLoads; ++l) bits[l] = __ldg(reinterpret_cast<const uint4*>(row + group * kGroup) + l);
      const factor_t* f = reinterpret_cast<const factor_t*>(bits);
      // Two 16-byte reads of the staged input (scalar reads 8 floats apart conflict 8 ways).
      float x[kGroup];
      *reinterpret_cast<float4*>(x) = reinterpret_cast<const float4*>(xs + group * kGroup)[0];
      *reinterpret_cast<float4*>(x + 4) = reinterpret_cast<const float4*>(xs + group * kGroup)[1];
#pragma unroll
      for (int j = 0; j < kGroup; ++j) acc = fmaf(factor_value<in_t>(f[j]), x[j], acc);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  return acc;
}

// Six CTAs per SM (at most 40 registers): small enough to run beside the GEMV's CTAs; unbounded,
// ptxas gave some activations 32 registers and spilled.
template <typename in_t, bool kActInput, GatedActivation kAct>
__global__ void __launch_bounds__(kGemvThreads, 6)
lora_a_kernel(LoraA lora, int64_t K, const int64_t* __restrict__ pair_expert, int64_t E, int64_t top_k,
              GemvInput<in_t, kActInput, kAct> in) {
  __shared__ __align__(16) float xs[kLoraChunk];
  allow_next_kernel_launch();  // the B product, which waits for this kernel
  const int64_t chunk = blockIdx.x, parts = gridDim.x, p = blockIdx.y, P = gridDim.y;
  const int64_t e = pair_expert[p];
  if (e >= 0 && e < E) {  // else a sentinel slot (a negative id asserts in gemv_kernel)
    const int64_t c0 = chunk * kLoraChunk;
    const int n = static_cast<int>(K - c0 < kLoraChunk ? K - c0 : kLoraChunk);
    for (int i = threadIdx.x; i < n; i += kGemvThreads) {
      xs[i] = to_float(from_float<in_t>(gemv_input(in, c0 + i, K, p, P, e, top_k)));
    }
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int64_t q = warp; q < lora.rank; q += kGemvWarps) {
      const int64_t row = (e * lora.rank + q) * K + c0;
      const float acc = lora.a_float ? lora_a_row_chunk<in_t>(static_cast<const float*>(lora.A) + row, xs, n, lane)
                                     : lora_a_row_chunk<in_t>(static_cast<const in_t*>(lora.A) + row, xs, n, lane);
      if (lane == 0) lora.u_parts[(p * lora.rank + q) * parts + chunk] = acc;
    }
  }
  wait_for_previous_kernel();  // the GEMV beside it
}

// A projection's LoRA B product: out[0, p, row] += scaling * B[e][row, :] . u[p] for every row and
// pair (grid: row blocks x pairs), into split 0 of the GEMV's partial sums [S, P, N] (for gate_up
// before the down GEMV stages act(h), as the routed path adds it before the activation; for down
// before the combine). A thread per row: its first kLoraPrefetch elements of B are loaded before
// the wait (they depend on no kernel), the rest after; u, the A product's parts summed in order and
// rounded to the input dtype, is staged in shared memory kLoraRankChunk ranks at a time.
constexpr int kLoraRankChunk = 1024;
constexpr int kLoraPrefetch = 16;

template <typename in_t>
__global__ void __launch_bounds__(kGemvThreads)
lora_b_kernel(LoraB lora, const int64_t* __restrict__ pair_expert, int64_t E, int64_t N, float* __restrict__ out) {
  __shared__ float u[kLoraRankChunk];
  allow_next_kernel_launch();  // the next GEMV (or the combine) reads its expert ids meanwhile
  const int64_t p = blockIdx.y, e = pair_expert[p];
  const int64_t row = int64_t{blockIdx.x} * kGemvThreads + threadIdx.x;
  const bool active = e >= 0 && e < E && row < N;  // e outside [0, E): a sentinel slot
  const int64_t b0 = e * lora.b_stride[0] + row * lora.b_stride[1], step = lora.b_stride[2];
  auto b_value = [&](int64_t q) {
    return lora.b_float ? factor_value<in_t>(static_cast<const float*>(lora.B)[b0 + q * step])
                        : factor_value<in_t>(static_cast<const in_t*>(lora.B)[b0 + q * step]);
  };
  float ahead[kLoraPrefetch];
#pragma unroll
  for (int q = 0; q < kLoraPrefetch; ++q) ahead[q] = active && q < lora.rank ? b_value(q) : 0.0f;
  wait_for_previous_kernel();  // u (the A product, which waited for the GEMV) and the GEMV's sums
  if (e < 0 || e >= E) return;
  float acc = 0.0f;
  for (int64_t q0 = 0; q0 < lora.rank; q0 += kLoraRankChunk) {
    const int m = static_cast<int>(std::min<int64_t>(lora.rank - q0, kLoraRankChunk));
    if (q0 > 0) __syncthreads();  // every thread is done with the previous chunk
    for (int i = threadIdx.x; i < m; i += kGemvThreads) {
      const float* parts = lora.u_parts + (p * lora.rank + q0 + i) * lora.parts;
      float sum = 0.0f;
      for (int64_t c = 0; c < lora.parts; ++c) sum += parts[c];  // fixed order: reproducible
      u[i] = to_float(from_float<in_t>(sum));
    }
    __syncthreads();
    if (!active) continue;
    int q = 0;
    if (q0 == 0) {
#pragma unroll
      for (int j = 0; j < kLoraPrefetch; ++j) {
        if (j < m) acc = fmaf(ahead[j], u[j], acc);
      }
      q = m < kLoraPrefetch ? m : kLoraPrefetch;
    }
#pragma unroll 16
    for (; q < m; ++q) acc = fmaf(b_value(q0 + q), u[q], acc);
  }
  if (active) out[p * N + row] += acc * lora.scaling;
}

// The codes of one 16-byte unit of a 4-bit row (32 weights) or two of an int8 row (32 weights).
template <bool kInt8>
struct UnitCodes {
  uint4 v[kInt8 ? 2 : 1];
};

// kInt8: the decode step reads one byte per weight (one scale per row, applied once per unit);
// otherwise a 4-bit codebook through the pair table, with plain or double-quantized block scales.
// kPairScales (double quant, blocks of 64+ weights, rows of an even number of units): lanes 2j
// and 2j + 1 read units of the same block in each row, so each loads and decodes the scales of
// two of the warp's four rows and takes the other two from its partner (one shuffle each): half
// the scale loads and map lookups of a step.
// kMma: the 4-bit products on tensor cores (gemv_mma_applies; the input vector staged in in_t),
// through code rings of kStages stages a warp.
// The kernels' body; gemv_kernel and gemv_dq_kernel (below) differ in their launch bounds only.
template <typename in_t, bool kActInput, GatedActivation kAct, bool kDoubleQuant, bool kInt8,
          bool kPairScales = false, bool kMma = false, int kStages = 3>
__device__ __forceinline__ void gemv(const uint8_t* __restrict__ packed, const Quant4Args& args, int64_t N, int64_t K,
    int64_t split_units, int log2_units_per_block, const int64_t* __restrict__ pair_expert, int64_t E, int64_t top_k,
    GemvInput<in_t, kActInput, kAct> in, GemvStart start, bool half_table, float* __restrict__ out) {
  extern __shared__ float4 staged[];  // split_units * kPaddedUnitFloats floats
  // Static, so that the pair table's address folds into the LDS instructions' immediate.
  __shared__ DecodeTables<kDoubleQuant> tables;
  float2* const pair_table = tables.pair;
  // 16-bit inputs: the table with 16-bit entries (half the shared-memory wavefronts per lookup).
  auto fill_table = [&] {
    if constexpr (kMma) {
      fill_mma_pair_table<in_t>(pair_table, args.codebook);
    } else if (half_table) {
      fill_half_pair_table(pair_table, args.codebook);
    } else {
      fill_pair_table(pair_table, args.codebook);  // one LDS.64 decodes two weights, conflict-free
    }
  };
  const int64_t s = blockIdx.y, p = blockIdx.z, P = gridDim.z;
  const bool first = start == GemvStart::kFirst;
  if (first) {
    // The call's first kernel, launched as a dependent of the stream's previous kernel (which may
    // have written the routing and the hidden states): only the table before the wait, and the
    // next kernel launches after it (a LoRA A product reads the input at once).
    if constexpr (!kInt8) fill_table();
    wait_for_previous_kernel();
  }
  if (start != GemvStart::kBeforeLora) allow_next_kernel_launch();
  // Before the wait, only what no kernel of this call writes: expert ids, weights, the table.
  const int64_t e = pair_expert[p];
  // Double quant: the dynamic map's loads go out with the expert id's, and the map is stored
  // after the input vector's loads are issued (copied before them, the CTA waited for two load
  // latencies in a row).
  [[maybe_unused]] DynamicMapEntries<kGemvThreads> map_entries;
  if constexpr (kDoubleQuant) map_entries.load();
  // A negative id is an error, checked on the device so that the path never waits for the host
  // (CUDA-graph capturable): like torch's own index checks, a device-side assert that fails the
  // next synchronizing call. One thread per pair reports it.
  if (e < 0 && threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) {
    CUDA_KERNEL_ASSERT_MSG(e >= 0, MOEQUANT_NEGATIVE_EXPERT_ID_MSG);
  }
  if (e < 0 || e >= E) {  // sentinel slot: never read
    wait_for_previous_kernel();
    return;
  }
  const int64_t units_per_row = K / 32;
  const int64_t unit0 = s * split_units;
  const int units = static_cast<int>(std::min(split_units, units_per_row - unit0));

  const MatrixScales<kDoubleQuant> scales(args.scales, e, tables.map);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t copy_offset = kMma || half_table ? half_pair_lane_offset() : lane_table_copy_offset();
  // The expert's matrix, found once with 64-bit math; offsets within it are 32-bit (its units and
  // blocks fit: decode_gemv_applies): 4-5% fewer instructions per step than 64-bit offsets.
  const UnitCodes<kInt8>* const expert_units =
      reinterpret_cast<const UnitCodes<kInt8>*>(packed) + e * N * units_per_row;
  const uint32_t row_units = static_cast<uint32_t>(units_per_row), last_row = static_cast<uint32_t>(N - 1);
  // Row tiles in 32 bits (N < 2^31: decode_gemv_applies), so that the loop's indices take one register each.
  const int row_tiles = static_cast<int>((N + kRowsPerCta - 1) / kRowsPerCta);

  // A warp's work is a sequence of steps (row tile, u0): lane l takes unit u0 + l of its
  // kRowsPerWarp rows. The next step's loads are issued before this step's decode, so that every
  // warp keeps a load in flight while it computes (one step per warp was latency-bound).
  struct Step {
    int tile;
    int u0;
  };
  struct MmaStep {
    int tile;
    int s;
  };
  auto next_step = [&](Step st) {
    st.u0 += 32;
    if (st.u0 >= units) st = {st.tile + static_cast<int>(gridDim.x), 0};
    return st;
  };
  static_assert(!kPairScales || (kDoubleQuant && kRowsPerWarp % 2 == 0), "pair scales: double quant, row pairs");
  // The rows whose scales this lane loads: all of them, or (kPairScales) rows 2p and 2p + 1 of
  // lane parity p.
  constexpr int kScaleRows = kPairScales ? kRowsPerWarp / 2 : kRowsPerWarp;
  const uint32_t first_scale_row = kPairScales ? 2u * (lane & 1) : 0u;
  UnitCodes<kInt8> bytes[kRowsPerWarp];
  LoadedScale amax[kScaleRows];
  auto load_step = [&](Step st) {
    if (st.tile >= row_tiles) return;
    const uint32_t u = static_cast<uint32_t>(unit0) + static_cast<uint32_t>(st.u0 + lane < units ? st.u0 + lane : 0);
    const uint32_t row0 = static_cast<uint32_t>(st.tile * kRowsPerCta + warp * kRowsPerWarp);
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const uint32_t r = min(row0 + rr, last_row);
      const uint32_t unit = r * row_units + u;  // from the start of the expert's matrix
      bytes[rr] = expert_units[unit];
      // int8: one scale per row (its "block"); 4-bit: one per block of units.
      if constexpr (!kPairScales) amax[rr] = scales.load(kInt8 ? r : unit >> log2_units_per_block);
    }
    if constexpr (kPairScales) {
#pragma unroll
      for (int i = 0; i < kScaleRows; ++i) {
        const uint32_t r = min(row0 + first_scale_row + i, last_row);
        amax[i] = scales.load((r * row_units + u) >> log2_units_per_block);
      }
    }
  };
  // The scales of the step's rows, resolved. kPairScales: every lane of the warp takes part (the
  // shuffles), before the lanes past the split's units leave the step.
  [[maybe_unused]] auto paired_scales = [&](const LoadedScale (&loaded)[kScaleRows], float (&scale)[kRowsPerWarp]) {
    float own[kScaleRows], partner[kScaleRows];
#pragma unroll
    for (int i = 0; i < kScaleRows; ++i) {
      own[i] = scales.resolve(loaded[i]);
      partner[i] = __shfl_xor_sync(0xffffffffu, own[i], 1);
    }
    const bool odd = lane & 1;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const bool mine = (rr / kScaleRows == 1) == odd;  // rows [0, 2) are the even lane's
      scale[rr] = mine ? own[rr % kScaleRows] : partner[rr % kScaleRows];
    }
  };
  float acc[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) acc[rr] = 0.0f;
  Step st{static_cast<int>(blockIdx.x), 0};
  // Tensor-core steps: warp (group, part) takes 16 rows of each tile over steps [mma_begin,
  // mma_end) of the split; lane (g, t) holds rows g and g + 8 (m16n8k16 A fragment rows).
  const int mma_group = warp % kMmaRowGroups, mma_part = warp / kMmaRowGroups, g = lane / 4, t = lane % 4;
  const int mma_steps = units / kMmaStepUnits;
  const int mma_begin = mma_part * mma_steps / kMmaKParts, mma_end = (mma_part + 1) * mma_steps / kMmaKParts;
  // A step is 16 rows x 128 bytes of codes, copied into this warp's ring (16-byte piece c of row r
  // at slot c ^ 2 (r % 4), so that the fragment reads below are conflict-free), and lane t's two
  // scales: row g (t < 2) or g + 8, the step's 64-weight pieces 2 (t % 2) and 2 (t % 2) + 1.
  using MmaScales = LoadedScale[2];
  static_assert(kStages >= 2, "a step in flight while one is decoded");
  constexpr int kAhead = kStages - 1;  // steps issued and not yet decoded, while one is
  auto next_mma_step = [&](MmaStep m) {
    if (++m.s >= mma_end) m = {m.tile + static_cast<int>(gridDim.x), mma_begin};
    return m;
  };
  MmaStep mst{static_cast<int>(blockIdx.x), mma_begin};
  MmaStep ahead = mst;  // the last step issued
  [[maybe_unused]] MmaScales mma_scales[kAhead];  // the steps issued ahead of mst, oldest first
  char* const mma_ring = reinterpret_cast<char*>(staged) + kMmaStagedBytes + warp * kStages * kMmaStageBytes;
  auto issue_mma_step = [&](MmaStep m, int stage, MmaScales& q) {
    if (m.tile < row_tiles && mma_begin < mma_end) {
      const uint32_t row0 = static_cast<uint32_t>(m.tile * kRowsPerCta + mma_group * 16);
      const uint32_t u = static_cast<uint32_t>(unit0) + static_cast<uint32_t>(m.s * kMmaStepUnits);
      const uint32_t dst = smem_addr(mma_ring + stage * kMmaStageBytes);
      const int c = lane % 8;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = lane / 8 + 4 * i;
        const uint32_t row = min(row0 + r, last_row);
        cp_async16(dst + r * 128 + ((c ^ ((r & 3) << 1)) << 4), expert_units + (row * row_units + u + c), true);
      }
      const uint32_t own_row = min(row0 + g + (t < 2 ? 0u : 8u), last_row);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        q[k] = scales.load((own_row * row_units + u + 2 * (2 * (t & 1) + k)) >> log2_units_per_block);
      }
    }
    cp_async_commit();  // empty past the end: one group per step either way
  };
  // The first step's weights only depend on the expert: their loads are in flight while the
  // table is filled and the input vector staged (one memory latency per CTA instead of two).
  if constexpr (kMma) {
    issue_mma_step(mst, 0, mma_scales[0]);
#pragma unroll
    for (int i = 1; i < kAhead; ++i) {
      ahead = next_mma_step(ahead);
      issue_mma_step(ahead, i, mma_scales[i]);
    }
  } else {
    load_step(st);
  }
  if constexpr (!kInt8) {
    if (!first) fill_table();
  }
  wait_for_previous_kernel();  // h (down's input) comes from an earlier kernel
  if (start == GemvStart::kBeforeLora) allow_next_kernel_launch();  // the A product reads the input now
  float* xs = reinterpret_cast<float*>(staged);
  in_t* const xh = reinterpret_cast<in_t*>(staged);  // kMma: the input vector in in_t, unpadded
#pragma unroll
  for (int k = 0; k < kStagedPerThread; ++k) {  // unrolled: all input loads in flight at once
    const int i = k * kGemvThreads + threadIdx.x;
    if (i < units * 32) {
      const float x = gemv_input(in, unit0 * 32 + i, K, p, P, e, top_k);
      if constexpr (kMma) {
        xh[i] = from_float<in_t>(x);
      } else {
        xs[i + (i / 32) * (kPaddedUnitFloats - 32)] = x;
      }
    }
  }
  if constexpr (kDoubleQuant) map_entries.store(tables.map);
  __syncthreads();
  if constexpr (kMma) {
    // Per tile, each warp's row sums of its input range (rows g and g + 8 of its group) go to
    // `partial`, double-buffered by tile; after one barrier the first 32 threads add the kMmaKParts
    // parts of each row in order and store them (fixed order: reproducible).
    __shared__ float partial[2][kMmaKParts][kRowsPerCta];
    int buffer = 0;
    float mma_acc = 0.0f;
    int stage = 0;  // mst's stage in the ring
    while (mst.tile < row_tiles) {
      const LoadedScale cur_scales[2] = {mma_scales[0][0], mma_scales[0][1]};
#pragma unroll
      for (int i = 0; i + 1 < kAhead; ++i) {
        mma_scales[i][0] = mma_scales[i + 1][0], mma_scales[i][1] = mma_scales[i + 1][1];
      }
      ahead = next_mma_step(ahead);
      __syncwarp();  // every lane has read the stage `ahead` refills (it held the previous step)
      issue_mma_step(ahead, stage == 0 ? kAhead : stage - 1, mma_scales[kAhead - 1]);
      cp_async_wait<kAhead>();  // this lane's pieces of mst have landed ...
      __syncwarp();        // ... and every lane's
      if (mma_begin < mma_end) {
        const char* const codes = mma_ring + stage * kMmaStageBytes;
        float half_sums[4];
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          // 64 weights of rows g and g + 8: lane t's bytes [8t, 8t + 8) of them (piece 2h + t / 2).
          const int piece = ((2 * h + (t >> 1)) ^ ((g & 3) << 1)) * 16 + 8 * (t & 1);
          const uint2 q0 = *reinterpret_cast<const uint2*>(codes + g * 128 + piece);
          const uint2 q1 = *reinterpret_cast<const uint2*>(codes + (g + 8) * 128 + piece);
          // Chunk c: bytes 2c and 2c + 1 of each lane's 8, i.e. input elements 16t + 4c .. 16t + 4c + 3
          // of these 64 in lane t (the B fragment's k = 2t, 2t + 1, 2t + 8, 2t + 9).
          const uint4* xv = reinterpret_cast<const uint4*>(xh + mst.s * (kMmaStepUnits * 32) + h * 64 + 16 * t);
          const uint4 x0 = xv[0], x1 = xv[1];
          const uint32_t xb[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
          float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const uint32_t lo = c < 2 ? q0.x : q0.y, hi = c < 2 ? q1.x : q1.y;
            const int i = 2 * (c & 1);
            const uint32_t a[4] = {mma_pair_lookup(pair_table, lo, i, copy_offset),
                                   mma_pair_lookup(pair_table, hi, i, copy_offset),
                                   mma_pair_lookup(pair_table, lo, i + 1, copy_offset),
                                   mma_pair_lookup(pair_table, hi, i + 1, copy_offset)};
            mma_16816<in_t>(d, a, xb[2 * c], xb[2 * c + 1]);
          }
          half_sums[h] = t < 2 ? d[0] : d[2];  // every column holds the same product
        }
        mma_acc = fmaf(t & 1 ? half_sums[2] : half_sums[0], scales.resolve(cur_scales[0]), mma_acc);
        mma_acc = fmaf(t & 1 ? half_sums[3] : half_sums[1], scales.resolve(cur_scales[1]), mma_acc);
      }
      stage = stage == kStages - 1 ? 0 : stage + 1;
      const MmaStep next = next_mma_step(mst);
      if (next.tile != mst.tile) {  // the tile's last step: reduce its rows
        const float v = mma_acc + __shfl_xor_sync(0xffffffffu, mma_acc, 1);  // both halves of the row
        if ((t & 1) == 0) partial[buffer][mma_part][mma_group * 16 + g + (t < 2 ? 0 : 8)] = v;
        mma_acc = 0.0f;
        __syncthreads();
        if (threadIdx.x < kRowsPerCta) {
          const int64_t row = int64_t{mst.tile} * kRowsPerCta + threadIdx.x;
          float sum = 0.0f;
#pragma unroll
          for (int k = 0; k < kMmaKParts; ++k) sum += partial[buffer][k][threadIdx.x];
          if (row < N) out[(s * P + p) * N + row] = sum;
        }
        buffer ^= 1;
      }
      mst = next;
    }
  }
  while (!kMma && st.tile < row_tiles) {
    UnitCodes<kInt8> cur[kRowsPerWarp];
    LoadedScale cur_amax[kScaleRows];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) cur[rr] = bytes[rr];
#pragma unroll
    for (int i = 0; i < kScaleRows; ++i) cur_amax[i] = amax[i];
    const Step next = next_step(st);
    load_step(next);
    [[maybe_unused]] float pair_scale[kRowsPerWarp];
    if constexpr (kPairScales) paired_scales(cur_amax, pair_scale);
    const int u = st.u0 + lane;
    if (u < units) {
      const float4* xu = reinterpret_cast<const float4*>(xs) + u * (kPaddedUnitFloats / 4);
      float sum[kRowsPerWarp];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) sum[rr] = 0.0f;
      if constexpr (kInt8) {
#pragma unroll
        for (int w = 0; w < 8; ++w) {  // 4 weights per 32-bit word, shared by the rows
          const float4 xw = xu[w];
          const float x[4] = {xw.x, xw.y, xw.z, xw.w};
#pragma unroll
          for (int rr = 0; rr < kRowsPerWarp; ++rr) {
            const uint4& c = cur[rr].v[w / 4];
            // Byte b of the word, as a float: 2^23 + (b + 128) built with one byte permute, minus
            // 2^23 + 128 (exact), instead of a shift and an int -> float conversion.
            const uint32_t word = (w % 4 == 0 ? c.x : w % 4 == 1 ? c.y : w % 4 == 2 ? c.z : c.w) ^ 0x80808080u;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float q = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7650u | i)) - 8388736.0f;
              sum[rr] = fmaf(q, x[i], sum[rr]);
            }
          }
        }
      } else {
        auto decode_unit = [&](auto lookup) {
#pragma unroll
          for (int w = 0; w < 4; ++w) {  // 8 weights per 32-bit word, shared by the rows
            const float4 xa = xu[2 * w], xb = xu[2 * w + 1];
            const float x[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
            for (int rr = 0; rr < kRowsPerWarp; ++rr) {
              const uint4& c = cur[rr].v[0];
              const uint32_t word = w == 0 ? c.x : w == 1 ? c.y : w == 2 ? c.z : c.w;
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const float2 v = lookup(word, i);
                sum[rr] = fmaf(v.x, x[2 * i], sum[rr]);
                sum[rr] = fmaf(v.y, x[2 * i + 1], sum[rr]);
              }
            }
          }
        };
        if (half_table) {
          decode_unit([&](uint32_t word, int i) { return half_pair_lookup(pair_table, word, i, copy_offset); });
        } else {
          decode_unit([&](uint32_t word, int i) { return pair_lookup(pair_table, word, i, copy_offset); });
        }
      }
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {  // one scale per unit
        if constexpr (kPairScales) {
          acc[rr] = fmaf(sum[rr], pair_scale[rr], acc[rr]);
        } else {
          acc[rr] = fmaf(sum[rr], scales.resolve(cur_amax[rr]), acc[rr]);
        }
      }
    }
    if (next.tile != st.tile) {  // the tile's last step: reduce its rows
      const int64_t row0 = int64_t{st.tile} * kRowsPerCta + warp * kRowsPerWarp;
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        float v = acc[rr];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if constexpr (kInt8) v *= kInt8InvScale;  // (q * row absmax) / 127, the 1/127 applied once
        if (lane == 0 && row0 + rr < N) out[(s * P + p) * N + row0 + rr] = v;
        acc[rr] = 0.0f;
      }
    }
    st = next;
  }
}

// kMma: the tensor-core GEMV, with rings of kStages stages: 85-86 KB of shared memory a CTA with
// three (two CTAs per SM), 69-70 KB with two (three CTAs per SM: it takes 69-80 registers
// unbounded, which three CTAs hold; a bound of three CTAs made ptxas spill, and a bound of one or
// two made it take 128-154 registers).
template <typename in_t, bool kActInput, GatedActivation kAct, bool kDoubleQuant, bool kInt8, bool kMma = false,
          int kStages = 3>
__global__ void __launch_bounds__(kGemvThreads)
gemv_kernel(const uint8_t* __restrict__ packed, const __grid_constant__ Quant4Args args, int64_t N, int64_t K,
                int64_t split_units, int log2_units_per_block, const int64_t* __restrict__ pair_expert, int64_t E,
                int64_t top_k, GemvInput<in_t, kActInput, kAct> in, GemvStart start,
                bool half_table, float* __restrict__ out) {
  gemv<in_t, kActInput, kAct, kDoubleQuant, kInt8, false, kMma, kStages>(packed, args, N, K, split_units,
                                                                         log2_units_per_block, pair_expert, E, top_k,
                                                                         in, start, half_table, out);
}

// Double-quantized 4-bit stacks on sm_90+: three CTAs per SM, as plain stacks get (78 registers).
// Unbounded, the GEMV of the hidden states (gate_up) takes 99 registers with double quant: two
// CTAs of 256 threads per SM, a third fewer loads in flight in a latency-bound kernel. (sm_80: the
// bound spills 12-16 bytes in the down GEMV, so there the unbounded kernel runs.)
template <typename in_t, bool kActInput, GatedActivation kAct, bool kPairScales>
__global__ void __launch_bounds__(kGemvThreads, 3)
gemv_dq_kernel(const uint8_t* __restrict__ packed, const __grid_constant__ Quant4Args args, int64_t N, int64_t K,
               int64_t split_units, int log2_units_per_block, const int64_t* __restrict__ pair_expert, int64_t E,
               int64_t top_k, GemvInput<in_t, kActInput, kAct> in, GemvStart start,
               bool half_table, float* __restrict__ out) {
  gemv<in_t, kActInput, kAct, true, false, kPairScales>(packed, args, N, K, split_units, log2_units_per_block,
                                                        pair_expert, E, top_k, in, start, half_table, out);
}

// Whether 4-bit GEMVs on 16-bit inputs decode through the table of 16-bit entries: opt-in,
// MOEQUANT_DECODE_HALF_TABLE=1 (read per call). It halves the lookups' shared-memory wavefronts
// but adds two conversions per byte: 1-2.5% faster where the GEMV is bound by shared memory
// (mixtral/deepseek T=1, three CTAs per SM), about a third slower where its CTAs are few and
// latency-bound (deepseek T=8: one CTA per (split, pair), 256 CTAs on 132 SMs).
static bool decode_half_table() {
  const char* v = std::getenv("MOEQUANT_DECODE_HALF_TABLE");
  return v != nullptr && std::string(v) == "1";
}

// Whether double-quant GEMVs share block scales between lane pairs (gemv_dq_kernel's kPairScales)
// where the stack allows it: MOEQUANT_DECODE_PAIR_SCALES=0 turns it off (comparisons; read once).
static bool decode_pair_scales() {
  static const bool on = [] {
    const char* v = std::getenv("MOEQUANT_DECODE_PAIR_SCALES");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

// Whether a stack's GEMV on 16-bit inputs runs on tensor cores (gemv<..., kMma>): 4-bit codes in
// blocks of 64 or more (an m16n8k16 step takes 64 weights of one block), rows of whole 256-weight
// steps, sm_80+, and MOEQUANT_DECODE_MMA is not "0" (the FFMA path, for comparisons and tests; read
// per call). The codes enter the products in the input dtype (bfloat16: 8 significant bits, as
// dequant_expert's weights have), the block scale is applied to each 64 weights' fp32 sum.
static bool gemv_mma_applies(const PackedStack& w) {
  const char* v = std::getenv("MOEQUANT_DECODE_MMA");
  if (v != nullptr && std::string(v) == "0") return false;
  return is_4bit(w.type) && w.blocksize >= 64 && w.cols % (kMmaStepUnits * 32) == 0 &&
         at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// Whether the double-quant GEMV runs gemv_dq_kernel: sm_90+, and MOEQUANT_DECODE_DQ_BOUNDS is not
// "0" (gemv_kernel without the occupancy bound, for comparisons; the switch is read once per process).
static bool decode_dq_bounded() {
  static const bool on = [] {
    const char* v = std::getenv("MOEQUANT_DECODE_DQ_BOUNDS");
    return v == nullptr || std::string(v) != "0";
  }();
  return on && at::cuda::getCurrentDeviceProperties()->major >= 9;
}

// out[t, c] = sum_j w[t, j] * (sum_s y[s, p, c] + b_d[e, c]) over valid slots, in slot order. The
// routing weights are read in their own dtype (w rounded to float32 as weights.to(float) does), so
// that no cast kernel precedes the call. The token's expert ids and weights come from outside the
// call: a chunk of kCombineSlots of them is read before waiting for the down GEMV, and each split's
// y loads of the chunk are issued together, so that the wait is followed by one round trip per split
// instead of a chain of dependent loads per slot (the combine runs after everything else).
constexpr int kCombineSlots = 8;

template <typename out_t, typename weight_t>
__global__ void __launch_bounds__(kGemvThreads)
decode_combine_kernel(const float* __restrict__ y, int64_t y_splits, const int64_t* __restrict__ pair_expert,
                      const weight_t* __restrict__ pair_weights, const float* __restrict__ bias,
                      out_t* __restrict__ out,
                      int64_t T, int64_t E, int64_t top_k, int64_t H) {
  allow_next_kernel_launch();  // a next call's first kernel may fill its table meanwhile
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const bool in_range = i < T * H;
  const int64_t t = in_range ? i / H : 0, c = i % H, P = T * top_k;
  float acc = 0.0f;
  for (int64_t j0 = 0; j0 < top_k; j0 += kCombineSlots) {  // top_k >= 1 here (decode_gemv_applies)
    int64_t e[kCombineSlots];
    float w[kCombineSlots], v[kCombineSlots];
#pragma unroll
    for (int s = 0; s < kCombineSlots; ++s) {
      const int64_t j = j0 + s;
      e[s] = in_range && j < top_k ? pair_expert[t * top_k + j] : E;  // E: skipped, as a sentinel is
      w[s] = in_range && j < top_k ? to_float(pair_weights[t * top_k + j]) : 0.0f;
      v[s] = 0.0f;
    }
    if (j0 == 0) wait_for_previous_kernel();  // y is the down GEMV's output; every thread waits once
    for (int64_t sp = 0; sp < y_splits; ++sp) {  // fixed order: reproducible
#pragma unroll
      for (int s = 0; s < kCombineSlots; ++s) {
        if (e[s] >= 0 && e[s] < E) v[s] += y[(sp * P + t * top_k + j0 + s) * H + c];
      }
    }
#pragma unroll
    for (int s = 0; s < kCombineSlots; ++s) {
      if (e[s] < 0 || e[s] >= E) continue;
      if (bias != nullptr) v[s] += bias[e[s] * H + c];
      acc += w[s] * v[s];
    }
  }
  if (in_range) out[i] = from_float<out_t>(acc);
}

template <typename F>
static void dispatch_gemv_activation(GatedActivation kind, F&& f) {
  switch (kind) {
    case GatedActivation::kSilu: f(std::integral_constant<GatedActivation, GatedActivation::kSilu>{}); return;
    case GatedActivation::kGelu: f(std::integral_constant<GatedActivation, GatedActivation::kGelu>{}); return;
    case GatedActivation::kGeluTanh: f(std::integral_constant<GatedActivation, GatedActivation::kGeluTanh>{}); return;
    case GatedActivation::kSwigluOai: f(std::integral_constant<GatedActivation, GatedActivation::kSwigluOai>{}); return;
  }
}

// A GEMV launch's dynamic shared memory and grid. One wave: as many CTAs as fit at once, each
// looping over row tiles of its (split, pair), so the table and the input vector are built once per
// CTA. `mma_stages`: the tensor-core kernel's ring depth, 0 for the FFMA kernels.
struct GemvGrid {
  int smem;
  dim3 grid;
  int64_t split_units;
  int64_t rounds;  // row tiles of the busiest CTA
};

template <typename KernelT>
static GemvGrid gemv_grid(KernelT kernel, const PackedStack& w, int64_t num_pairs, int mma_stages) {
  const GemvSplit split = gemv_split(w.cols);
  // The staged input vector (+ 32 KB of static table); on tensor cores also the warps' code rings.
  const int smem = mma_stages > 0 ? mma_smem_bytes(mma_stages)
                                  : static_cast<int>(split.units * kPaddedUnitFloats * sizeof(float));
  if (mma_stages > 0) allow_dynamic_smem(kernel, smem);
  const int64_t row_tiles = (w.rows + kRowsPerCta - 1) / kRowsPerCta;
  const int64_t ctas = persistent_grid(kernel, kGemvThreads, row_tiles * split.splits * num_pairs, smem);
  const int64_t ctas_x = std::clamp<int64_t>(ctas / (split.splits * num_pairs), 1, row_tiles);
  const dim3 grid(static_cast<unsigned>(ctas_x), static_cast<unsigned>(split.splits), static_cast<unsigned>(num_pairs));
  return {smem, grid, split.units, (row_tiles + ctas_x - 1) / ctas_x};
}

// Launches `kernel` on the grid gemv_grid gave it.
template <typename KernelT, typename in_t, bool kActInput, GatedActivation kAct>
static void launch_gemv(KernelT kernel, const GemvGrid& g, const PackedStack& w, const at::Tensor& pair_expert,
                        int64_t top_k, const GemvInput<in_t, kActInput, kAct>& input, float* out, cudaStream_t stream,
                        bool dependent, GemvStart start) {
  const QuantStackView view = w.view();
  const Quant4Args args{view.scales, view.codebook, view.type};
  const int log2_units_per_block =
      is_4bit(w.type) ? __builtin_ctzll(static_cast<unsigned long long>(w.blocksize / 32)) : 0;  // int8: unused
  launch_kernel(kernel, g.grid, kGemvThreads, g.smem, stream, dependent, static_cast<const uint8_t*>(view.data), args,
                w.rows, w.cols, g.split_units, log2_units_per_block, pair_expert.const_data_ptr<int64_t>(), w.experts,
                top_k, input, start, is_4bit(w.type) && sizeof(in_t) == 2 && decode_half_table(), out);
}

// The tensor-core GEMV's ring depth: two stages (three CTAs per SM) where that gives the busiest
// CTA fewer row tiles than three stages (two CTAs per SM) do, else three. These calls are paced by
// their CTAs more than by the bytes each keeps in flight: qwen3-30b-a3b's gate_up at T=1 (384 row
// tiles) is one round at three CTAs per SM and two at two (H100, chained calls: -10% a call), and
// two stages gain 0.6-8.5% wherever they take fewer rounds (T=8 on the four reference shapes, T=1
// on mixtral-8x7b and deepseek-v3, LoRA included). Where both depths take as many rounds the
// deeper ring is faster: olmoe-1b-7b at T=1 (512 tiles, two rounds either way) is 5% slower with
// two stages, 13% with LoRA; deepseek-v3 at T=8 with LoRA, 25% slower with both projections on two
// stages (its gate_up has one CTA per split and pair at either depth; down alone on two: -2%).
// MOEQUANT_DECODE_MMA_STAGES = "2" or "3" forces a depth (comparisons and tests; read per call).
static int gemv_mma_stages(const GemvGrid& shallow, const GemvGrid& deep) {
  if (const char* v = std::getenv("MOEQUANT_DECODE_MMA_STAGES")) {
    if (std::string(v) == "2") return 2;
    if (std::string(v) == "3") return 3;
  }
  return shallow.rounds < deep.rounds ? 2 : 3;
}

// The GEMV of one stack, instantiated for its format.
template <typename in_t, bool kActInput, GatedActivation kAct>
static void launch_for_format(const PackedStack& w, int64_t num_pairs, const at::Tensor& pair_expert, int64_t top_k,
                              const GemvInput<in_t, kActInput, kAct>& input, float* out, cudaStream_t stream,
                              bool dependent, GemvStart start) {
  if constexpr (sizeof(in_t) == 2) {
    if (gemv_mma_applies(w)) {
      const bool dq = w.double_quant();
      const auto deep = dq ? gemv_kernel<in_t, kActInput, kAct, true, false, true, 3>
                           : gemv_kernel<in_t, kActInput, kAct, false, false, true, 3>;
      const auto shallow = dq ? gemv_kernel<in_t, kActInput, kAct, true, false, true, 2>
                              : gemv_kernel<in_t, kActInput, kAct, false, false, true, 2>;
      const GemvGrid deep_grid = gemv_grid(deep, w, num_pairs, 3), shallow_grid = gemv_grid(shallow, w, num_pairs, 2);
      if (gemv_mma_stages(shallow_grid, deep_grid) == 2) {
        launch_gemv(shallow, shallow_grid, w, pair_expert, top_k, input, out, stream, dependent, start);
      } else {
        launch_gemv(deep, deep_grid, w, pair_expert, top_k, input, out, stream, dependent, start);
      }
      return;
    }
  }
  // Pair scales: lanes 2j and 2j + 1 read units 2j and 2j + 1 of a row, one block when blocks
  // hold two or more units and rows (hence splits and steps) start on even units.
  const bool pair_scales = w.blocksize >= 64 && (w.cols / 32) % 2 == 0 && decode_pair_scales();
  const auto kernel = !is_4bit(w.type)     ? gemv_kernel<in_t, kActInput, kAct, false, true>   // int8
                      : !w.double_quant()   ? gemv_kernel<in_t, kActInput, kAct, false, false>  // plain scales
                      : !decode_dq_bounded() ? gemv_kernel<in_t, kActInput, kAct, true, false>
                      : pair_scales          ? gemv_dq_kernel<in_t, kActInput, kAct, true>
                                             : gemv_dq_kernel<in_t, kActInput, kAct, false>;
  launch_gemv(kernel, gemv_grid(kernel, w, num_pairs, 0), w, pair_expert, top_k, input, out, stream, dependent,
              start);
}

// One projection's LoRA as the decode kernels see it: the A product (lora_a_kernel, into `u_parts`
// [P, rank, chunks]) and the B product of the kernel after the projection's GEMV. Empty when the
// projection has none.
struct DecodeLoraViews {
  LoraA a;
  LoraB b;  // b.parts: the A product's input chunks
};

static DecodeLoraViews lora_views(const DecodeLora& lora, int64_t num_pairs, at::Tensor& u_parts) {
  if (!lora.present()) return {};
  const int64_t rank = lora.A.size(1), chunks = (lora.A.size(2) + kLoraChunk - 1) / kLoraChunk;
  u_parts = at::empty({num_pairs, rank, chunks}, lora.A.options().dtype(at::kFloat));
  DecodeLoraViews v;
  v.a.A = lora.A.const_data_ptr();
  v.a.a_float = lora.A.scalar_type() == at::kFloat;
  v.a.rank = rank;
  v.a.u_parts = u_parts.mutable_data_ptr<float>();
  v.b.u_parts = u_parts.const_data_ptr<float>();
  v.b.parts = chunks;
  v.b.B = lora.B.const_data_ptr();
  for (int d = 0; d < 3; ++d) v.b.b_stride[d] = lora.B.stride(d);
  v.b.b_float = lora.B.scalar_type() == at::kFloat;
  v.b.rank = rank;
  v.b.scaling = static_cast<float>(lora.scaling);
  return v;
}

// Launches the A product of a projection's LoRA (lora_a_kernel) on the GEMV's own input spec.
template <typename in_t, bool kActInput, GatedActivation kAct>
static void launch_lora_a(const DecodeLoraViews& lora, int64_t K, int64_t num_pairs, const at::Tensor& pair_expert,
                          int64_t E, int64_t top_k, const GemvInput<in_t, kActInput, kAct>& in, cudaStream_t stream,
                          bool dependent) {
  // lora_a_row_chunk reads A's rows in 8-element, 16-byte aligned groups (decode_gemv_applies
  // takes only inputs of whole 32-weight units; decode_lora aligns A).
  TORCH_INTERNAL_ASSERT(K % 8 == 0 && reinterpret_cast<uintptr_t>(lora.a.A) % 16 == 0,
                        "decode LoRA: A rows must be 16-byte aligned groups of 8, got K = ", K);
  const dim3 grid(static_cast<unsigned>(lora.b.parts), static_cast<unsigned>(num_pairs));
  launch_kernel(lora_a_kernel<in_t, kActInput, kAct>, grid, kGemvThreads, 0, stream, dependent, lora.a, K,
                pair_expert.const_data_ptr<int64_t>(), E, top_k, in);
}

// Launches the B product of a projection's LoRA (lora_b_kernel) into split 0 of `out` [S, P, N].
template <typename in_t>
static void launch_lora_b(const DecodeLoraViews& lora, int64_t N, int64_t num_pairs, const at::Tensor& pair_expert,
                          int64_t E, float* out, cudaStream_t stream, bool dependent) {
  const dim3 grid(static_cast<unsigned>((N + kGemvThreads - 1) / kGemvThreads), static_cast<unsigned>(num_pairs));
  launch_kernel(lora_b_kernel<in_t>, grid, kGemvThreads, 0, stream, dependent, lora.b,
                pair_expert.const_data_ptr<int64_t>(), E, N, out);
}

at::Tensor decode_gemv_forward(const at::Tensor& hidden_in, const at::Tensor& top_k_index,
                               const at::Tensor& top_k_weights,
                               const PackedStack& gate_up, const PackedStack& down, const ActivationSpec& act,
                               const at::Tensor& gate_up_bias, const at::Tensor& down_bias,
                               const DecodeLora& gate_up_lora, const DecodeLora& down_lora) {
  const at::Tensor hidden = hidden_in.contiguous();
  const int64_t T = hidden.size(0), H = hidden.size(1), k = top_k_index.size(1), P = T * k;
  const int64_t E = gate_up.experts, I = down.cols;
  const at::Tensor pair_expert = top_k_index.to(at::kLong).contiguous().view({-1});
  const at::Tensor pair_weights = top_k_weights.contiguous();
  // No device -> host copy or sync anywhere below (a negative id is a device-side assert in
  // gemv_kernel; buffers come from the caching allocator): the call can be captured in a CUDA graph.
  const auto f32 = hidden.options().dtype(at::kFloat);
  const int64_t gu_splits = gemv_split(H).splits, d_splits = gemv_split(I).splits;
  // Split partial sums (a LoRA term joins split 0 of its projection's in lora_b_kernel).
  at::Tensor h = at::empty({gu_splits, P, 2 * I}, f32);
  at::Tensor y = at::empty({d_splits, P, H}, f32);
  at::Tensor out = at::empty({T, H}, hidden.options());
  at::Tensor gate_up_u, down_u;  // LoRA A product parts, alive until the kernels that read them have run
  const DecodeLoraViews lora1 = lora_views(gate_up_lora, P, gate_up_u);
  const DecodeLoraViews lora2 = lora_views(down_lora, P, down_u);
  auto stream = at::cuda::getCurrentCUDAStream();
  // The first kernel reads its inputs (routing, hidden states) after waiting for the stream's
  // previous kernel when launched as its dependent (launches.first); the rest depend on their
  // predecessor in the call (launches.chain). Without LoRA: GEMV, GEMV, combine. A projection's
  // LoRA adds its A product beside the GEMV (launched as its dependent, once the GEMV has waited for
  // its input, so that the A product can read the same input without waiting) and its B product
  // after both: GEMV, A, B (into h), GEMV, A, B (into y), combine.
  const DecodeLaunches launches = decode_launches();
  const bool pdl = launches.chain;
  MOEQUANT_DISPATCH_EXPERTS_TYPES(hidden.scalar_type(), "moequant_decode_gemv", [&] {
    using T_ = typename native<scalar_t>::type;
    dispatch_gemv_activation(act.kind, [&](auto kind) {
      constexpr GatedActivation kAct = decltype(kind)::value;
      const GemvInput<T_, false, kAct> in1{reinterpret_cast<const T_*>(hidden.const_data_ptr()), nullptr, 0, nullptr,
                                           act.interleaved, act.alpha, act.limit};
      const bool lora_gu = gate_up_lora.present(), lora_d = down_lora.present();
      const auto start = [](bool is_first, bool lora) {
        return is_first ? GemvStart::kFirst : lora ? GemvStart::kBeforeLora : GemvStart::kChained;
      };
      launch_for_format(gate_up, P, pair_expert, k, in1, h.mutable_data_ptr<float>(), stream, launches.first,
                        start(launches.first, lora_gu));
      if (lora_gu) {
        launch_lora_a(lora1, H, P, pair_expert, E, k, in1, stream, pdl);
        launch_lora_b<T_>(lora1, 2 * I, P, pair_expert, E, h.mutable_data_ptr<float>(), stream, pdl);
      }
      const GemvInput<T_, true, kAct> in2{nullptr, h.const_data_ptr<float>(), gu_splits,
                                          gate_up_bias.defined() ? gate_up_bias.const_data_ptr<float>() : nullptr,
                                          act.interleaved, act.alpha, act.limit};
      launch_for_format(down, P, pair_expert, k, in2, y.mutable_data_ptr<float>(), stream, pdl,
                        start(false, lora_d));
      if (lora_d) {
        launch_lora_a(lora2, I, P, pair_expert, E, k, in2, stream, pdl);
        launch_lora_b<T_>(lora2, H, P, pair_expert, E, y.mutable_data_ptr<float>(), stream, pdl);
      }
    });
    using out_t = T_;
    const auto weights_type = pair_weights.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights_type, "moequant_decode_combine", [&] {
      using W_ = typename native<scalar_t>::type;
      const unsigned combine_ctas = static_cast<unsigned>((T * H + kGemvThreads - 1) / kGemvThreads);
      launch_kernel(decode_combine_kernel<out_t, W_>, dim3(combine_ctas), kGemvThreads, 0, stream, pdl,
                    y.const_data_ptr<float>(), d_splits, pair_expert.const_data_ptr<int64_t>(),
                    reinterpret_cast<const W_*>(pair_weights.const_data_ptr()),
                    down_bias.defined() ? down_bias.const_data_ptr<float>() : nullptr,
                    reinterpret_cast<out_t*>(out.mutable_data_ptr()), T, E, k, H);
    });
  });
  return out;
}

}  // namespace moequant
