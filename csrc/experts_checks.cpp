#include "experts_checks.h"

#include "error_text.h"
#include "quant_checks.h"

namespace moequant {

GatedActivation parse_activation(c10::string_view name) {
  if (name == "silu") return GatedActivation::kSilu;
  if (name == "gelu") return GatedActivation::kGelu;
  if (name == "gelu_tanh") return GatedActivation::kGeluTanh;
  if (name == "swiglu_oai") return GatedActivation::kSwigluOai;
  TORCH_CHECK(false, "moequant.experts: activation must be one of \"silu\", \"gelu\", \"gelu_tanh\", "
              "\"swiglu_oai\", got \"", std::string(name), "\"");
}

static bool is_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
         t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble;
}

static void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& hidden) {
  TORCH_CHECK(t.device() == hidden.device(), op, ": ", name, " must be on ", hidden.device(),
              " like hidden_states, got ", t.device());
}

// One quantized stack, logical [E, rows, cols]: packed uint8 [E, rows, cols/2] (nf4, fp4) or
// int8 [E, rows, cols], with plain or double-quantized statistics. Returns whether it is
// double-quantized.
static bool check_stack(const char* op, const char* name, QuantType type, const at::Tensor& packed,
                        const at::Tensor& absmax, const std::optional<at::Tensor>& absmax_scale,
                        const std::optional<at::Tensor>& absmax_offset, int64_t blocksize, const at::Tensor& hidden,
                        const c10::SymInt& rows, const c10::SymInt& cols) {
  const bool four_bit = is_4bit(type);
  TORCH_CHECK(packed.scalar_type() == (four_bit ? at::kByte : at::kChar), op, ": ", name, "_packed must be ",
              four_bit ? "uint8 [E, N, K/2]" : "int8 [E, N, K]", " for quant_type \"", quant_type_name(type),
              "\", got ", packed.scalar_type());
  check_same_device(op, (std::string(name) + "_packed").c_str(), packed, hidden);
  const c10::SymInt packed_cols = four_bit ? cols / 2 : cols;
  TORCH_CHECK(packed.sym_size(1) == rows && packed.sym_size(2) == packed_cols && (!four_bit || cols % 2 == 0), op,
              ": ", name, "_packed must hold a logical [E, ", num_str(rows), ", ", num_str(cols), "] ",
              quant_type_name(type), " weight (packed [E, ", num_str(rows), ", ", num_str(packed_cols),
              "]), got packed shape ", dims_str(packed.sym_sizes()));
  StackShape shape;
  shape.type = type;
  shape.leading = {packed.sym_size(0)};
  shape.rows = rows;
  shape.cols = cols;
  if (four_bit) {
    check_blocksize(blocksize);
    TORCH_CHECK(shape.matrix_numel() % blocksize == 0, op, ": N*K of each ", name,
                " matrix must be a multiple of blocksize=", num_str(blocksize), ", got packed shape ",
                dims_str(packed.sym_sizes()));
  }
  check_statistics(op, std::string(name) + "_", shape, blocksize, absmax, absmax_scale, absmax_offset, packed);
  return absmax.scalar_type() == at::kByte;
}

static void check_bias(const char* op, const char* name, const std::optional<at::Tensor>& bias,
                       const at::Tensor& hidden, const c10::SymInt& experts, const c10::SymInt& features) {
  if (!bias.has_value()) return;
  TORCH_CHECK(is_float(*bias), op, ": ", name, " must be a float tensor, got ", bias->scalar_type());
  check_same_device(op, name, *bias, hidden);
  TORCH_CHECK(bias->dim() == 2 && bias->sym_size(0) == experts && bias->sym_size(1) == features, op, ": ",
              name, " must have shape [", num_str(experts), ", ", num_str(features), "], got ", dims_str(bias->sym_sizes()));
}

// LoRA factors of one projection: A [E, r, in], B [E, out, r]; both or neither.
static bool check_lora(const char* op, const char* name, const std::optional<at::Tensor>& a,
                       const std::optional<at::Tensor>& b, const at::Tensor& hidden,
                       const c10::SymInt& experts, const c10::SymInt& in, const c10::SymInt& out) {
  TORCH_CHECK(a.has_value() == b.has_value(), op, ": ", name, "_lora_A and ", name,
              "_lora_B must be given together");
  if (!a.has_value()) return false;
  TORCH_CHECK(is_float(*a) && is_float(*b), op, ": ", name, " LoRA factors must be float tensors, got ",
              a->scalar_type(), " and ", b->scalar_type());
  check_same_device(op, (std::string(name) + "_lora_A").c_str(), *a, hidden);
  check_same_device(op, (std::string(name) + "_lora_B").c_str(), *b, hidden);
  TORCH_CHECK(a->dim() == 3 && a->sym_size(0) == experts && a->sym_size(2) == in, op, ": ", name,
              "_lora_A must have shape [", num_str(experts), ", r, ", num_str(in), "], got ", dims_str(a->sym_sizes()));
  TORCH_CHECK(b->dim() == 3 && b->sym_size(0) == experts && b->sym_size(1) == out, op, ": ", name,
              "_lora_B must have shape [", num_str(experts), ", ", num_str(out), ", r], got ", dims_str(b->sym_sizes()));
  TORCH_CHECK(a->sym_size(1) == b->sym_size(2), op, ": ", name, " LoRA ranks disagree: ", name,
              "_lora_A has r=", num_str(a->sym_size(1)), ", ", name, "_lora_B has r=", num_str(b->sym_size(2)));
  return true;
}

ExpertsProblem check_experts_args(const char* op, const at::Tensor& hidden_states,
                                  const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                  MOEQUANT_EXPERTS_PARAMS) {
  ExpertsProblem p;
  p.activation = parse_activation(activation);
  p.quant_type = parse_quant_type(quant_type);
  TORCH_CHECK(hidden_states.dim() == 2 && is_float(hidden_states), op,
              ": hidden_states must be a float tensor [T, H], got ", hidden_states.scalar_type(), " ",
              dims_str(hidden_states.sym_sizes()));
  TORCH_CHECK(top_k_index.dim() == 2 && (top_k_index.scalar_type() == at::kLong ||
                                         top_k_index.scalar_type() == at::kInt),
              op, ": top_k_index must be int64 or int32 [T, k], got ", top_k_index.scalar_type(), " ",
              dims_str(top_k_index.sym_sizes()));
  TORCH_CHECK(top_k_weights.dim() == 2 && is_float(top_k_weights), op,
              ": top_k_weights must be a float tensor [T, k], got ", top_k_weights.scalar_type(), " ",
              dims_str(top_k_weights.sym_sizes()));
  p.tokens = hidden_states.sym_size(0);
  p.hidden = hidden_states.sym_size(1);
  p.top_k = top_k_index.sym_size(1);
  TORCH_CHECK(top_k_index.sym_size(0) == p.tokens, op, ": top_k_index must have T=", num_str(p.tokens),
              " rows like hidden_states, got ", dims_str(top_k_index.sym_sizes()));
  TORCH_CHECK(top_k_weights.sym_sizes() == top_k_index.sym_sizes(), op,
              ": top_k_weights must have the shape of top_k_index ", dims_str(top_k_index.sym_sizes()), ", got ",
              dims_str(top_k_weights.sym_sizes()));
  check_same_device(op, "top_k_index", top_k_index, hidden_states);
  check_same_device(op, "top_k_weights", top_k_weights, hidden_states);

  TORCH_CHECK(gate_up_packed.dim() == 3, op, ": gate_up_packed must be a stack [E, N, K/2] (int8: [E, N, K]), "
              "got shape ", dims_str(gate_up_packed.sym_sizes()));
  TORCH_CHECK(down_packed.dim() == 3, op, ": down_packed must be a stack [E, N, K/2] (int8: [E, N, K]), got shape ",
              dims_str(down_packed.sym_sizes()));
  p.experts = gate_up_packed.sym_size(0);
  TORCH_CHECK(down_packed.sym_size(0) == p.experts, op, ": gate_up and down stacks must hold the same "
              "number of experts, got ", num_str(p.experts), " and ", num_str(down_packed.sym_size(0)));
  // Logical layouts: [E, 2I, H] / [E, H, I], or transposed [E, H, 2I] / [E, I, H].
  const c10::SymInt gate_up_features =
      transposed ? gate_up_packed.sym_size(2) * (is_4bit(p.quant_type) ? 2 : 1) : gate_up_packed.sym_size(1);
  TORCH_CHECK(gate_up_features % 2 == 0, op, ": the gate_up stack must have an even number (2I) of "
              "output features, got ", num_str(gate_up_features));
  p.intermediate = gate_up_features / 2;
  const c10::SymInt gate_up_rows = transposed ? p.hidden : p.intermediate * 2;
  const c10::SymInt gate_up_cols = transposed ? p.intermediate * 2 : p.hidden;
  const c10::SymInt down_rows = transposed ? p.intermediate : p.hidden;
  const c10::SymInt down_cols = transposed ? p.hidden : p.intermediate;
  p.gate_up_double_quant = check_stack(op, "gate_up", p.quant_type, gate_up_packed, gate_up_absmax,
                                       gate_up_absmax_scale, gate_up_absmax_offset, blocksize, hidden_states,
                                       gate_up_rows, gate_up_cols);
  p.down_double_quant = check_stack(op, "down", p.quant_type, down_packed, down_absmax, down_absmax_scale,
                                    down_absmax_offset, blocksize, hidden_states, down_rows, down_cols);
  check_bias(op, "gate_up_bias", gate_up_bias, hidden_states, p.experts, p.intermediate * 2);
  check_bias(op, "down_bias", down_bias, hidden_states, p.experts, p.hidden);
  p.has_gate_up_lora = check_lora(op, "gate_up", gate_up_lora_A, gate_up_lora_B, hidden_states, p.experts,
                                  p.hidden, p.intermediate * 2);
  p.has_down_lora = check_lora(op, "down", down_lora_A, down_lora_B, hidden_states, p.experts,
                               p.intermediate, p.hidden);
  return p;
}

}  // namespace moequant
