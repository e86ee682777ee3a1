// Kernel entry points, one per op and backend. ops/ registers them with the dispatcher.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace moequant {

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& weight, int64_t blocksize);
at::Tensor dequant_expert_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::ScalarType dtype, std::optional<int64_t> expert);

// Decodes `num_blocks` consecutive NF4 blocks into `out` (CPU); also used by the experts kernels.
template <typename out_t>
void dequant_nf4_blocks_cpu(const uint8_t* packed, const float* absmax, out_t* out,
                            int64_t num_blocks, int64_t blocksize);

#ifdef MOEQUANT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& weight, int64_t blocksize);
at::Tensor dequant_expert_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               at::ScalarType dtype, std::optional<int64_t> expert);
#endif

}  // namespace moequant

// ---- experts ops ------------------------------------------------------------------------
// Every experts kernel takes the arguments of MOEQUANT_EXPERTS_ARGS (ops/library.cpp) in order.
#define MOEQUANT_EXPERTS_PARAMS                                                                 \
  const at::Tensor &gate_up_packed, const at::Tensor &gate_up_absmax,                          \
      const at::Tensor &down_packed, const at::Tensor &down_absmax, int64_t blocksize,          \
      c10::string_view activation, bool transposed, bool interleaved,                          \
      const std::optional<at::Tensor>&gate_up_bias, const std::optional<at::Tensor>&down_bias, \
      const std::optional<at::Tensor>&gate_up_lora_A,                                           \
      const std::optional<at::Tensor>&gate_up_lora_B, double gate_up_lora_scaling,              \
      const std::optional<at::Tensor>&down_lora_A, const std::optional<at::Tensor>&down_lora_B, \
      double down_lora_scaling, double act_alpha, double act_limit

namespace moequant {

at::Tensor experts_forward_cpu(const at::Tensor& hidden_states, const at::Tensor& top_k_index,
                               const at::Tensor& top_k_weights, MOEQUANT_EXPERTS_PARAMS);
std::tuple<at::Tensor, at::Tensor> experts_forward_train_cpu(const at::Tensor& hidden_states,
                                                             const at::Tensor& top_k_index,
                                                             const at::Tensor& top_k_weights,
                                                             MOEQUANT_EXPERTS_PARAMS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& hidden_states, const at::Tensor& top_k_index,
    const at::Tensor& top_k_weights, const std::optional<at::Tensor>& gate_up_out, MOEQUANT_EXPERTS_PARAMS);

#ifdef MOEQUANT_WITH_CUDA
at::Tensor experts_forward_cuda(const at::Tensor& hidden_states, const at::Tensor& top_k_index,
                                const at::Tensor& top_k_weights, MOEQUANT_EXPERTS_PARAMS);
std::tuple<at::Tensor, at::Tensor> experts_forward_train_cuda(const at::Tensor& hidden_states,
                                                              const at::Tensor& top_k_index,
                                                              const at::Tensor& top_k_weights,
                                                              MOEQUANT_EXPERTS_PARAMS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& hidden_states, const at::Tensor& top_k_index,
    const at::Tensor& top_k_weights, const std::optional<at::Tensor>& gate_up_out, MOEQUANT_EXPERTS_PARAMS);
#endif

}  // namespace moequant
