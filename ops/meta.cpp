// Meta (fake) kernels: exact output shapes and dtypes, and the same argument checks as the real
// kernels, so torch.compile and opcheck see what the CPU/CUDA kernels would return.
#include <torch/library.h>

#include "../csrc/kernels.h"
#include "../csrc/quant_checks.h"

namespace moequant {

static std::tuple<at::Tensor, at::Tensor> quantize_nf4_meta(const at::Tensor& weight, int64_t blocksize,
                                                            c10::string_view quant_type) {
  const StackShape shape = check_quantize_args(weight, blocksize, parse_quant_type(quant_type));
  return {at::empty_symint(shape.packed_sizes(), weight.options().dtype(shape.packed_dtype())),
          at::empty_symint(shape.absmax_sizes(blocksize), weight.options().dtype(at::kFloat))};
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_statistics_meta(const at::Tensor& absmax) {
  check_compress_statistics_args(absmax);
  return empty_compressed_statistics(absmax);
}

static at::Tensor dequant_expert_meta(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                      at::ScalarType dtype, std::optional<int64_t> expert,
                                      c10::string_view quant_type, const std::optional<at::Tensor>& absmax_scale,
                                      const std::optional<at::Tensor>& absmax_offset) {
  const StackShape shape = check_dequant_args(packed, absmax, blocksize, dtype, expert, parse_quant_type(quant_type),
                                              absmax_scale, absmax_offset);
  return at::empty_symint(dequant_output_sizes(shape, expert), packed.options().dtype(dtype));
}

}  // namespace moequant

TORCH_LIBRARY_IMPL(moequant, Meta, m) {
  m.impl("quantize_nf4", &moequant::quantize_nf4_meta);
  m.impl("compress_statistics", &moequant::compress_statistics_meta);
  m.impl("dequant_expert", &moequant::dequant_expert_meta);
}

// ---- experts ops ----
#include "../csrc/error_text.h"
#include "../csrc/experts_checks.h"

namespace moequant {

static at::Tensor experts_forward_meta(const at::Tensor& hidden_states, const at::Tensor& top_k_index,
                                       const at::Tensor& top_k_weights, MOEQUANT_EXPERTS_PARAMS) {
  check_experts_args("moequant.experts_forward", hidden_states, top_k_index, top_k_weights,
                     MOEQUANT_EXPERTS_ARG_NAMES);
  return at::empty_like(hidden_states, at::MemoryFormat::Contiguous);
}

static std::tuple<at::Tensor, at::Tensor> experts_forward_train_meta(const at::Tensor& hidden_states,
                                                                     const at::Tensor& top_k_index,
                                                                     const at::Tensor& top_k_weights,
                                                                     MOEQUANT_EXPERTS_PARAMS) {
  const ExpertsProblem p = check_experts_args("moequant._experts_forward_train", hidden_states, top_k_index,
                                              top_k_weights, MOEQUANT_EXPERTS_ARG_NAMES);
  return {at::empty_like(hidden_states, at::MemoryFormat::Contiguous),
          at::empty_symint({p.tokens * p.top_k, p.intermediate * 2}, hidden_states.options())};
}

static at::Tensor lora_grad_meta(const std::optional<at::Tensor>& factor, const at::Tensor& hidden) {
  return factor.has_value() ? at::empty_like(*factor, at::MemoryFormat::Contiguous)
                            : at::empty({0}, hidden.options());
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& hidden_states, const at::Tensor& top_k_index,
    const at::Tensor& top_k_weights, const std::optional<at::Tensor>& gate_up_out, MOEQUANT_EXPERTS_PARAMS) {
  const ExpertsProblem p = check_experts_args("moequant.experts_backward", hidden_states, top_k_index,
                                              top_k_weights, MOEQUANT_EXPERTS_ARG_NAMES);
  TORCH_CHECK(grad_out.sym_sizes() == hidden_states.sym_sizes(), "moequant.experts_backward: grad_out must "
              "have shape ", dims_str(hidden_states.sym_sizes()), ", got ", dims_str(grad_out.sym_sizes()));
  return {at::empty_like(hidden_states, at::MemoryFormat::Contiguous),
          at::empty_like(top_k_weights, at::MemoryFormat::Contiguous),
          lora_grad_meta(gate_up_lora_A, hidden_states),
          lora_grad_meta(gate_up_lora_B, hidden_states),
          lora_grad_meta(down_lora_A, hidden_states),
          lora_grad_meta(down_lora_B, hidden_states)};
}

}  // namespace moequant

TORCH_LIBRARY_IMPL(moequant, Meta, m) {
  m.impl("experts_forward", &moequant::experts_forward_meta);
  m.impl("_experts_forward_train", &moequant::experts_forward_train_meta);
  m.impl("experts_backward", &moequant::experts_backward_meta);
}
