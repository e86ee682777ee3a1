#include "experts_checks.h"

#include "error_text.h"
#include "nf4_checks.h"

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

// One packed stack: uint8 [E, rows, cols/2] with absmax [E, rows*cols/blocksize].
static void check_stack(const char* op, const char* name, const at::Tensor& packed,
                        const at::Tensor& absmax, int64_t blocksize, const at::Tensor& hidden,
                        const c10::SymInt& rows, const c10::SymInt& cols) {
  TORCH_CHECK(packed.dim() == 3, op, ": ", name, "_packed must be a stack uint8 [E, N, K/2], got shape ",
              dims_str(packed.sym_sizes()));
  check_dequant_args(packed, absmax, blocksize, at::kFloat, std::nullopt);
  check_same_device(op, name, packed, hidden);
  TORCH_CHECK(packed.sym_size(1) == rows && packed.sym_size(2) * 2 == cols, op, ": ", name,
              "_packed must hold a logical [E, ", num_str(rows), ", ", num_str(cols), "] weight (packed [E, ", num_str(rows), ", ",
              num_str(cols / 2), "]), got packed shape ", dims_str(packed.sym_sizes()));
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

  TORCH_CHECK(gate_up_packed.dim() == 3, op, ": gate_up_packed must be uint8 [E, N, K/2], got shape ",
              dims_str(gate_up_packed.sym_sizes()));
  TORCH_CHECK(down_packed.dim() == 3, op, ": down_packed must be uint8 [E, N, K/2], got shape ",
              dims_str(down_packed.sym_sizes()));
  p.experts = gate_up_packed.sym_size(0);
  TORCH_CHECK(down_packed.sym_size(0) == p.experts, op, ": gate_up and down stacks must hold the same "
              "number of experts, got ", num_str(p.experts), " and ", num_str(down_packed.sym_size(0)));
  // Logical layouts: [E, 2I, H] / [E, H, I], or transposed [E, H, 2I] / [E, I, H].
  const c10::SymInt gate_up_features = transposed ? gate_up_packed.sym_size(2) * 2 : gate_up_packed.sym_size(1);
  TORCH_CHECK(gate_up_features % 2 == 0, op, ": the gate_up stack must have an even number (2I) of "
              "output features, got ", num_str(gate_up_features));
  p.intermediate = gate_up_features / 2;
  if (transposed) {
    check_stack(op, "gate_up", gate_up_packed, gate_up_absmax, blocksize, hidden_states, p.hidden, p.intermediate * 2);
    check_stack(op, "down", down_packed, down_absmax, blocksize, hidden_states, p.intermediate, p.hidden);
  } else {
    check_stack(op, "gate_up", gate_up_packed, gate_up_absmax, blocksize, hidden_states, p.intermediate * 2, p.hidden);
    check_stack(op, "down", down_packed, down_absmax, blocksize, hidden_states, p.hidden, p.intermediate);
  }
  check_bias(op, "gate_up_bias", gate_up_bias, hidden_states, p.experts, p.intermediate * 2);
  check_bias(op, "down_bias", down_bias, hidden_states, p.experts, p.hidden);
  p.has_gate_up_lora = check_lora(op, "gate_up", gate_up_lora_A, gate_up_lora_B, hidden_states, p.experts,
                                  p.hidden, p.intermediate * 2);
  p.has_down_lora = check_lora(op, "down", down_lora_A, down_lora_B, hidden_states, p.experts,
                               p.intermediate, p.hidden);
  return p;
}

}  // namespace moequant
