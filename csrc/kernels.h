// Kernel entry points, one per op and backend. ops/ registers them with the dispatcher.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "quant_format.h"

namespace moequant {

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& weight, int64_t blocksize,
                                                    c10::string_view quant_type);
std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_statistics_cpu(const at::Tensor& absmax);
at::Tensor dequant_expert_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::ScalarType dtype, std::optional<int64_t> expert, c10::string_view quant_type,
                              const std::optional<at::Tensor>& absmax_scale,
                              const std::optional<at::Tensor>& absmax_offset);

// Matrices of a quantized stack as raw pointers: what the CPU kernels decode from.
struct QuantMatrices {
  QuantType type = QuantType::kNF4;
  const void* data = nullptr;  // uint8 4-bit pairs, or int8 codes
  BlockScales scales;          // one scale per block (4-bit) or per row (int8)
  int64_t matrix_numel = 0;    // N*K
  int64_t block_numel = 0;     // blocksize (4-bit) or K (int8)
};

// Decodes matrices [first, first + count) of a stack into `out` (CPU, parallel over blocks);
// also used by the experts kernels.
template <typename out_t>
void dequant_matrices_cpu(const QuantMatrices& m, int64_t first, int64_t count, out_t* out);

// x [x_rows, K] (fp32) times matrix `matrix` of a stack, S [rows, cols], without an fp32 copy of
// all of S: `x . S^T` (K = cols, out [x_rows, rows]) or, with times_stored, `x . S` (K = rows,
// out [x_rows, cols]). Up to `on_the_fly_rows` rows, S is decoded into L1 as it is used, with sums
// in a fixed order (bitwise the same for any thread count or CPU); above, in pieces for BLAS.
at::Tensor quant_matmul_cpu(const QuantMatrices& m, int64_t matrix, int64_t rows, int64_t cols, const at::Tensor& x,
                            bool times_stored, int64_t on_the_fly_rows);

#ifdef MOEQUANT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& weight, int64_t blocksize,
                                                     c10::string_view quant_type);
std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_statistics_cuda(const at::Tensor& absmax);
at::Tensor dequant_expert_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               at::ScalarType dtype, std::optional<int64_t> expert, c10::string_view quant_type,
                               const std::optional<at::Tensor>& absmax_scale,
                               const std::optional<at::Tensor>& absmax_offset);
#endif

}  // namespace moequant

// ---- experts ops ------------------------------------------------------------------------
// Every experts kernel takes the arguments of MOEQUANT_EXPERTS_ARGS (ops/library.cpp) in order.
#define MOEQUANT_EXPERTS_PARAMS                                                                   \
  const at::Tensor &gate_up_packed, const at::Tensor &gate_up_absmax,                            \
      const at::Tensor &down_packed, const at::Tensor &down_absmax, int64_t blocksize,            \
      c10::string_view activation, bool transposed, bool interleaved,                            \
      const std::optional<at::Tensor>&gate_up_bias, const std::optional<at::Tensor>&down_bias,   \
      const std::optional<at::Tensor>&gate_up_lora_A,                                             \
      const std::optional<at::Tensor>&gate_up_lora_B, double gate_up_lora_scaling,                \
      const std::optional<at::Tensor>&down_lora_A, const std::optional<at::Tensor>&down_lora_B,   \
      double down_lora_scaling, double act_alpha, double act_limit, c10::string_view quant_type, \
      const std::optional<at::Tensor>&gate_up_absmax_scale,                                       \
      const std::optional<at::Tensor>&gate_up_absmax_offset,                                      \
      const std::optional<at::Tensor>&down_absmax_scale,                                          \
      const std::optional<at::Tensor>&down_absmax_offset

// The same arguments by name, to forward them.
#define MOEQUANT_EXPERTS_ARG_NAMES                                                                   \
  gate_up_packed, gate_up_absmax, down_packed, down_absmax, blocksize, activation, transposed,     \
      interleaved, gate_up_bias, down_bias, gate_up_lora_A, gate_up_lora_B, gate_up_lora_scaling,   \
      down_lora_A, down_lora_B, down_lora_scaling, act_alpha, act_limit, quant_type,                \
      gate_up_absmax_scale, gate_up_absmax_offset, down_absmax_scale, down_absmax_offset

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
