// One CTA per routing-order row. Activations are evaluated in fp32 with IEEE expf/erff/tanhf
// (no fast math), matching moequant/reference.py up to rounding.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cuda_utils.cuh"
#include "experts_activation.cuh"
#include "experts_common.cuh"

namespace moequant {

constexpr int kActThreads = 256;

// act(g, u) and its partial derivatives d/dg, d/du.
template <GatedActivation kAct>
__device__ __forceinline__ float gated_act(float g, float u, float alpha, float limit, float* d_gate, float* d_up) {
  if constexpr (kAct == GatedActivation::kSilu) {
    const float s = 1.0f / (1.0f + expf(-g));
    const float silu = g * s;
    *d_gate = u * s * (1.0f + g * (1.0f - s));
    *d_up = silu;
    return silu * u;
  } else if constexpr (kAct == GatedActivation::kGelu) {
    const float cdf = 0.5f * (1.0f + erff(g * 0.7071067811865476f));
    const float pdf = expf(-0.5f * g * g) * 0.3989422804014327f;
    *d_gate = u * (cdf + g * pdf);
    *d_up = g * cdf;
    return g * cdf * u;
  } else if constexpr (kAct == GatedActivation::kGeluTanh) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f, kCoef = 0.044715f;
    const float t = tanhf(kSqrt2OverPi * (g + kCoef * g * g * g));
    const float gelu = 0.5f * g * (1.0f + t);
    *d_gate = u * (0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kCoef * g * g));
    *d_up = gelu;
    return gelu * u;
  } else {  // kSwigluOai (gpt-oss): clamp gate above, up both sides; clamps pass NaN through
    const float gc = g > limit ? limit : g;
    const float uc = u > limit ? limit : (u < -limit ? -limit : u);
    const float sig = 1.0f / (1.0f + expf(-alpha * gc));
    const float glu = gc * sig;
    // torch.clamp's backward passes the gradient where the input lies inside the (inclusive) bounds.
    *d_gate = g <= limit ? (uc + 1.0f) * (sig + gc * alpha * sig * (1.0f - sig)) : 0.0f;
    *d_up = (u >= -limit && u <= limit) ? glu : 0.0f;
    return (uc + 1.0f) * glu;
  }
}

// The gate and up values of kVec consecutive activations i0 .. i0 + kVec - 1 of a gate_up row
// (halves, or interleaved pairs), and the matching stores.
template <int kVec, typename T>
__device__ __forceinline__ void load_gate_up(const T* h, int64_t i0, int64_t inter, bool interleaved,
                                             float (&g)[kVec], float (&u)[kVec]) {
  if (interleaved) {
    float both[2 * kVec];
    load_floats<2 * kVec>(h + 2 * i0, both);
#pragma unroll
    for (int k = 0; k < kVec; ++k) g[k] = both[2 * k], u[k] = both[2 * k + 1];
  } else {
    load_floats<kVec>(h + i0, g);
    load_floats<kVec>(h + inter + i0, u);
  }
}

template <int kVec, typename T>
__device__ __forceinline__ void store_gate_up(T* h, int64_t i0, int64_t inter, bool interleaved,
                                              const float (&g)[kVec], const float (&u)[kVec]) {
  if (interleaved) {
    float both[2 * kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) both[2 * k] = g[k], both[2 * k + 1] = u[k];
    store_floats<2 * kVec>(h + 2 * i0, both);
  } else {
    store_floats<kVec>(h + i0, g);
    store_floats<kVec>(h + inter + i0, u);
  }
}

// kVec activations a thread: 16 bytes of each input row where row_vector_width allows it, else 1.
template <typename T, GatedActivation kAct, int kVec>
__global__ void __launch_bounds__(kActThreads)
bias_activation_kernel(T* __restrict__ gate_up, const float* __restrict__ bias, const int32_t* __restrict__ sorted_expert,
                       T* __restrict__ act, int64_t inter, bool interleaved, float alpha, float limit) {
  const int64_t row = blockIdx.x;
  T* h = gate_up + row * 2 * inter;
  const float* b = bias != nullptr ? bias + int64_t{sorted_expert[row]} * 2 * inter : nullptr;
  for (int64_t i0 = int64_t{threadIdx.x} * kVec; i0 < inter; i0 += int64_t{blockDim.x} * kVec) {
    float g[kVec], u[kVec], a[kVec];
    load_gate_up<kVec>(h, i0, inter, interleaved, g, u);
    if (b != nullptr) {
      float bg[kVec], bu[kVec];
      load_gate_up<kVec>(b, i0, inter, interleaved, bg, bu);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {  // rounded to T, as stored, before the activation reads them
        g[k] = to_float(from_float<T>(g[k] + bg[k]));
        u[k] = to_float(from_float<T>(u[k] + bu[k]));
      }
      store_gate_up<kVec>(h, i0, inter, interleaved, g, u);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float dg, du;
      a[k] = gated_act<kAct>(g[k], u[k], alpha, limit, &dg, &du);
    }
    store_floats<kVec>(act + row * inter + i0, a);
  }
}

template <typename T, GatedActivation kAct, int kVec>
__global__ void __launch_bounds__(kActThreads)
activation_backward_kernel(const T* __restrict__ gate_up, const T* grad_act,
                           const float* __restrict__ row_weights,
                           const T* __restrict__ grad_out_rows, const float* __restrict__ down_bias,
                           const int32_t* __restrict__ sorted_expert, const int32_t* __restrict__ sorted_pair,
                           T* __restrict__ grad_gate_up, float* __restrict__ grad_pair_weights, T* act_out,
                           int64_t inter, int64_t hidden, bool interleaved, float alpha, float limit) {
  // act_out may be grad_act itself: a thread reads its elements before it overwrites them.
  __shared__ float reduce_scratch[kActThreads / 32];
  const int64_t row = blockIdx.x;
  const T* h = gate_up + row * 2 * inter;
  T* dh = grad_gate_up + row * 2 * inter;
  const float w = row_weights[row];
  float dot = 0.0f;
  for (int64_t i0 = int64_t{threadIdx.x} * kVec; i0 < inter; i0 += int64_t{blockDim.x} * kVec) {
    float g[kVec], u[kVec], z[kVec], a[kVec];
    load_gate_up<kVec>(h, i0, inter, interleaved, g, u);
    load_floats<kVec>(grad_act + row * inter + i0, z);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float dg, du;
      a[k] = to_float(from_float<T>(gated_act<kAct>(g[k], u[k], alpha, limit, &dg, &du)));
      dot += z[k] * a[k];
      g[k] = w * z[k] * dg;  // now the gradients
      u[k] = w * z[k] * du;
    }
    store_gate_up<kVec>(dh, i0, inter, interleaved, g, u);
    if (act_out != nullptr) store_floats<kVec>(act_out + row * inter + i0, a);
  }
  if (down_bias != nullptr) {
    const float* b = down_bias + int64_t{sorted_expert[row]} * hidden;
    const T* g = grad_out_rows + row * hidden;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) dot += to_float(g[c]) * b[c];
  }
  const float total = block_sum<kActThreads>(dot, reduce_scratch);
  if (threadIdx.x == 0) grad_pair_weights[sorted_pair[row]] = total;
}

template <typename F>
static void dispatch_activation(GatedActivation kind, F&& f) {
  switch (kind) {
    case GatedActivation::kSilu: f(std::integral_constant<GatedActivation, GatedActivation::kSilu>{}); return;
    case GatedActivation::kGelu: f(std::integral_constant<GatedActivation, GatedActivation::kGelu>{}); return;
    case GatedActivation::kGeluTanh: f(std::integral_constant<GatedActivation, GatedActivation::kGeluTanh>{}); return;
    case GatedActivation::kSwigluOai: f(std::integral_constant<GatedActivation, GatedActivation::kSwigluOai>{}); return;
  }
  TORCH_CHECK(false, "moequant: unknown activation");
}

at::Tensor gate_up_bias_activation(at::Tensor& gate_up, const at::Tensor& bias, const ExpertsRouting& r,
                                   const ActivationSpec& spec) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(0) == r.num_rows, "moequant: bad gate_up buffer");
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor act = at::empty({r.num_rows, inter}, gate_up.options());
  if (r.num_rows == 0 || inter == 0) return act;
  auto stream = at::cuda::getCurrentCUDAStream();
  MOEQUANT_DISPATCH_EXPERTS_TYPES(gate_up.scalar_type(), "moequant_bias_activation", [&] {
    using T = typename native<scalar_t>::type;
    const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
    const int width = row_vector_width<T>(inter, {gate_up.const_data_ptr(), b, act.const_data_ptr()});
    dispatch_activation(spec.kind, [&](auto kind) {
      dispatch_vector_width<T>(width, [&](auto vec) {
        bias_activation_kernel<T, decltype(kind)::value, decltype(vec)::value>
            <<<static_cast<unsigned>(r.num_rows), kActThreads, 0, stream>>>(
                reinterpret_cast<T*>(gate_up.mutable_data_ptr()), b, r.sorted_expert.const_data_ptr<int32_t>(),
                reinterpret_cast<T*>(act.mutable_data_ptr()), inter, spec.interleaved, spec.alpha, spec.limit);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return act;
}

ActivationGrads gate_up_activation_backward(const at::Tensor& gate_up, at::Tensor& grad_act,
                                            const at::Tensor& row_weights, const at::Tensor& grad_out_rows,
                                            const at::Tensor& down_bias, const ExpertsRouting& r,
                                            const ActivationSpec& spec, bool want_act) {
  TORCH_CHECK(gate_up.is_contiguous() && grad_act.is_contiguous() && row_weights.is_contiguous(),
              "moequant: activation backward needs contiguous buffers");
  const int64_t inter = gate_up.size(1) / 2;
  ActivationGrads out;
  out.grad_gate_up = at::empty_like(gate_up);
  out.grad_pair_weights = at::zeros({r.num_pairs}, gate_up.options().dtype(at::kFloat));
  if (want_act) out.act = grad_act;  // written in place: the caller no longer needs grad_act
  if (r.num_rows == 0) return out;
  const int64_t hidden = down_bias.defined() ? grad_out_rows.size(1) : 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  MOEQUANT_DISPATCH_EXPERTS_TYPES(gate_up.scalar_type(), "moequant_activation_backward", [&] {
    using T = typename native<scalar_t>::type;
    const int width = row_vector_width<T>(
        inter, {gate_up.const_data_ptr(), grad_act.const_data_ptr(), out.grad_gate_up.const_data_ptr()});
    dispatch_activation(spec.kind, [&](auto kind) {
      dispatch_vector_width<T>(width, [&](auto vec) {
        activation_backward_kernel<T, decltype(kind)::value, decltype(vec)::value>
            <<<static_cast<unsigned>(r.num_rows), kActThreads, 0, stream>>>(
                reinterpret_cast<const T*>(gate_up.const_data_ptr()),
                reinterpret_cast<const T*>(grad_act.const_data_ptr()), row_weights.const_data_ptr<float>(),
                down_bias.defined() ? reinterpret_cast<const T*>(grad_out_rows.const_data_ptr()) : nullptr,
                down_bias.defined() ? down_bias.const_data_ptr<float>() : nullptr,
                r.sorted_expert.const_data_ptr<int32_t>(), r.sorted_pair.const_data_ptr<int32_t>(),
                reinterpret_cast<T*>(out.grad_gate_up.mutable_data_ptr()),
                out.grad_pair_weights.mutable_data_ptr<float>(),
                want_act ? reinterpret_cast<T*>(out.act.mutable_data_ptr()) : nullptr, inter, hidden,
                spec.interleaved, spec.alpha, spec.limit);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

}  // namespace moequant
