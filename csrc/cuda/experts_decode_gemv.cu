// Decode GEMV. Launch 1: h[p] = W_gu[e] x[t] (fp32) for every pair p = (t, j). Launch 2:
// y[p] = W_d[e] act(h[p] + b_gu[e]), the activation fused into the load of the input vector.
// Launch 3: out[t] = sum_j w[t, j] (y[p] + b_d[e]) in slot order. In launches 1-2 a warp owns
// kRowsPerWarp output rows; each lane decodes 16-byte units (32 weights) of the packed rows
// directly and multiplies with the input vector held in shared memory, padded by one float
// every 32 so that lanes reading different units hit different banks. Rows are reduced by a
// fixed shuffle tree: results are reproducible.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>

#include "experts_common.cuh"
#include "experts_decode_gemv.cuh"
#include "nf4_dequant.cuh"

namespace moequant {

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kRowsPerWarp = 4;
constexpr int64_t kDefaultDecodeMaxPairs = 64;

bool decode_gemv_applies(int64_t num_pairs, bool transposed, const PackedStack& gate_up, const PackedStack& down) {
  int64_t max_pairs = kDefaultDecodeMaxPairs;
  if (const char* v = std::getenv("MOEQUANT_DECODE_MAX_PAIRS")) max_pairs = std::atoll(v);
  if (num_pairs == 0 || num_pairs > max_pairs || transposed) return false;
  // Rows must be whole 16-byte units, and both input vectors must fit in shared memory.
  const int64_t max_smem = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  auto ok = [&](const PackedStack& w) { return w.cols % 32 == 0 && (w.cols + w.cols / 32) * 4 <= max_smem; };
  return ok(gate_up) && ok(down);
}

// Input vector element c of the pair: either the token's hidden state, or act(h + bias).
template <typename in_t, bool kActInput, GatedActivation kAct>
struct GemvInput {
  const in_t* hidden;      // [T, K]
  const float* gate_up;    // [P, 2K] (kActInput)
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

template <typename in_t, bool kActInput, GatedActivation kAct>
__global__ void __launch_bounds__(kGemvThreads)
nf4_gemv_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax, int64_t N, int64_t K,
                int log2_units_per_block, const int64_t* __restrict__ pair_expert, int64_t E, int64_t top_k,
                GemvInput<in_t, kActInput, kAct> in, float* __restrict__ out) {
  extern __shared__ float xs[];  // K + K/32 floats, element c at c + c/32
  __shared__ float codebook[16];
  const int64_t p = blockIdx.y;
  const int64_t e = pair_expert[p];
  if (e >= E) return;  // sentinel slot: never read by the combine
  if (threadIdx.x < 16) codebook[threadIdx.x] = kNF4ValuesDevice[threadIdx.x];
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
    float v;
    if constexpr (kActInput) {
      const int64_t gi = in.interleaved ? 2 * c : c, ui = in.interleaved ? 2 * c + 1 : K + c;
      float g = in.gate_up[p * 2 * K + gi], u = in.gate_up[p * 2 * K + ui];
      if (in.bias != nullptr) {
        g += in.bias[e * 2 * K + gi];
        u += in.bias[e * 2 * K + ui];
      }
      v = gated_value<kAct>(g, u, in.alpha, in.limit);
    } else {
      v = to_float(in.hidden[(p / top_k) * K + c]);
    }
    xs[c + c / 32] = v;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = (int64_t{blockIdx.x} * kGemvWarps + warp) * kRowsPerWarp;
  if (row0 >= N) return;
  const int64_t units_per_row = K / 32;
  const uint4* units = reinterpret_cast<const uint4*>(packed);
  float acc[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) acc[rr] = 0.0f;
  for (int64_t u = lane; u < units_per_row; u += 32) {
    uint4 bytes[kRowsPerWarp];
    float amax[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {  // all loads in flight before the first use
      const int64_t n = row0 + rr < N ? row0 + rr : N - 1;
      const int64_t unit = (e * N + n) * units_per_row + u;
      bytes[rr] = units[unit];
      amax[rr] = absmax[unit >> log2_units_per_block];
    }
    const float* x = xs + u * 33;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const uint32_t words[4] = {bytes[rr].x, bytes[rr].y, bytes[rr].z, bytes[rr].w};
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t byte = (words[w] >> (8 * i)) & 0xFFu;
          s = fmaf(codebook[byte >> 4], x[w * 8 + 2 * i], s);
          s = fmaf(codebook[byte & 0xFu], x[w * 8 + 2 * i + 1], s);
        }
      }
      acc[rr] = fmaf(s, amax[rr], acc[rr]);  // one scale per 32-element unit
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    float v = acc[rr];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0 && row0 + rr < N) out[p * N + row0 + rr] = v;
  }
}

// out[t] = sum_j w[t, j] * (y[p] + b_d[e]) over valid slots, in slot order.
template <typename out_t>
__global__ void __launch_bounds__(kGemvThreads)
decode_combine_kernel(const float* __restrict__ y, const int64_t* __restrict__ pair_expert,
                      const float* __restrict__ pair_weights, const float* __restrict__ bias, out_t* __restrict__ out,
                      int64_t E, int64_t top_k, int64_t H) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t p = t * top_k + j, e = pair_expert[p];
      if (e >= E) continue;
      float v = y[p * H + c];
      if (bias != nullptr) v += bias[e * H + c];
      acc += pair_weights[p] * v;
    }
    out[t * H + c] = from_float<out_t>(acc);
  }
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

template <typename KernelT>
static void launch_gemv(KernelT kernel, const PackedStack& w, const at::Tensor& packed, const at::Tensor& absmax,
                        int64_t num_pairs, const at::Tensor& pair_expert, int64_t top_k, const auto& input,
                        float* out, cudaStream_t stream) {
  const int64_t smem = (w.cols + w.cols / 32) * static_cast<int64_t>(sizeof(float));
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int64_t rows_per_cta = int64_t{kGemvWarps} * kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((w.rows + rows_per_cta - 1) / rows_per_cta), static_cast<unsigned>(num_pairs));
  const int log2_units_per_block = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize / 32));
  kernel<<<grid, kGemvThreads, smem, stream>>>(packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), w.rows,
                                               w.cols, log2_units_per_block, pair_expert.const_data_ptr<int64_t>(),
                                               w.experts, top_k, input, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor decode_gemv_forward(const at::Tensor& hidden_in, const at::Tensor& top_k_index, const at::Tensor& pair_weights,
                               const PackedStack& gate_up, const PackedStack& down, const ActivationSpec& act,
                               const at::Tensor& gate_up_bias, const at::Tensor& down_bias) {
  const at::Tensor hidden = hidden_in.contiguous();
  const int64_t T = hidden.size(0), H = hidden.size(1), k = top_k_index.size(1), P = T * k;
  const int64_t E = gate_up.experts, I = down.cols;
  const at::Tensor pair_expert = top_k_index.to(at::kLong).contiguous().view({-1});
  // The one host sync of this path: a negative expert id must raise, not index out of bounds.
  TORCH_CHECK(pair_expert.min().item<int64_t>() >= 0,
              "moequant.experts_forward: top_k_index holds a negative expert id; ids must be in [0, ",
              std::to_string(E), ") (or >= ", std::to_string(E), " for sentinel slots that contribute zero)");
  const at::Tensor gu_packed = contiguous_aligned16(gate_up.packed), gu_absmax = gate_up.absmax.contiguous();
  const at::Tensor d_packed = contiguous_aligned16(down.packed), d_absmax = down.absmax.contiguous();
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor h = at::empty({P, 2 * I}, f32);
  at::Tensor y = at::empty({P, H}, f32);
  at::Tensor out = at::empty({T, H}, hidden.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  MOEQUANT_DISPATCH_EXPERTS_TYPES(hidden.scalar_type(), "moequant_decode_gemv", [&] {
    using T_ = typename native<scalar_t>::type;
    dispatch_gemv_activation(act.kind, [&](auto kind) {
      constexpr GatedActivation kAct = decltype(kind)::value;
      const GemvInput<T_, false, kAct> in1{reinterpret_cast<const T_*>(hidden.const_data_ptr()), nullptr, nullptr,
                                           act.interleaved, act.alpha, act.limit};
      launch_gemv(nf4_gemv_kernel<T_, false, kAct>, gate_up, gu_packed, gu_absmax, P, pair_expert, k, in1,
                  h.mutable_data_ptr<float>(), stream);
      const GemvInput<T_, true, kAct> in2{nullptr, h.const_data_ptr<float>(),
                                          gate_up_bias.defined() ? gate_up_bias.const_data_ptr<float>() : nullptr,
                                          act.interleaved, act.alpha, act.limit};
      launch_gemv(nf4_gemv_kernel<T_, true, kAct>, down, d_packed, d_absmax, P, pair_expert, k, in2,
                  y.mutable_data_ptr<float>(), stream);
    });
    decode_combine_kernel<T_><<<static_cast<unsigned>(T), kGemvThreads, 0, stream>>>(
        y.const_data_ptr<float>(), pair_expert.const_data_ptr<int64_t>(), pair_weights.const_data_ptr<float>(),
        down_bias.defined() ? down_bias.const_data_ptr<float>() : nullptr, reinterpret_cast<T_*>(out.mutable_data_ptr()),
        E, k, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace moequant
