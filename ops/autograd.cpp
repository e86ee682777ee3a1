// Autograd of experts_forward: its backward is experts_backward. Registered at the Autograd key
// so eager autograd, torch.compile/AOTAutograd and C++ callers all get the same formula.
// Saved for backward: the inputs (packed stacks and statistics are frozen and held anyway) and
// the gate_up projection output — never a dequantized weight; experts_backward recomputes those.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include "../csrc/kernels.h"

namespace moequant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// autograd::Function records device/dtype of every tensor argument, so absent optional inputs
// travel as defined placeholders plus a presence bit mask.
at::Tensor tensor_or_placeholder(const std::optional<at::Tensor>& t, const at::Tensor& like) {
  return t.has_value() ? *t : at::empty({0}, like.options());
}

std::optional<at::Tensor> present_or_none(const at::Tensor& t, bool present) {
  return present ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Bits of the presence mask.
enum Present : int64_t {
  kGuBiasBit = 1,
  kDBiasBit = 2,
  kGuLoraBit = 4,
  kDLoraBit = 8,
  kGuDoubleQuantBit = 16,  // gate_up_absmax_scale / _offset
  kDDoubleQuantBit = 32,   // down_absmax_scale / _offset
};

class ExpertsForward : public torch::autograd::Function<ExpertsForward> {
 public:
  // Tensor inputs in schema order (optional ones may be placeholders), then gate_up_out.
  enum Input { kHidden, kIndex, kWeights, kGuPacked, kGuAbsmax, kDPacked, kDAbsmax, kGuBias, kDBias,
               kGuA, kGuB, kDA, kDB, kGuScale, kGuOffset, kDScale, kDOffset, kGateUpOut };

  static at::Tensor forward(AutogradContext* ctx, at::Tensor hidden, at::Tensor index, at::Tensor weights,
                            at::Tensor gu_packed, at::Tensor gu_absmax, at::Tensor d_packed, at::Tensor d_absmax,
                            int64_t blocksize, std::string activation, bool transposed, bool interleaved,
                            at::Tensor gu_bias, at::Tensor d_bias, at::Tensor gu_A, at::Tensor gu_B,
                            double gu_scaling, at::Tensor d_A, at::Tensor d_B, double d_scaling, double act_alpha,
                            double act_limit, std::string quant_type, at::Tensor gu_scale, at::Tensor gu_offset,
                            at::Tensor d_scale, at::Tensor d_offset, int64_t present) {
    static auto train_op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("moequant::_experts_forward_train", "")
                               .typed<decltype(experts_forward_train_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, gate_up_out] = train_op.call(
        hidden, index, weights, gu_packed, gu_absmax, d_packed, d_absmax, blocksize, activation, transposed,
        interleaved, present_or_none(gu_bias, present & kGuBiasBit), present_or_none(d_bias, present & kDBiasBit),
        present_or_none(gu_A, present & kGuLoraBit), present_or_none(gu_B, present & kGuLoraBit), gu_scaling,
        present_or_none(d_A, present & kDLoraBit), present_or_none(d_B, present & kDLoraBit), d_scaling, act_alpha,
        act_limit, quant_type, present_or_none(gu_scale, present & kGuDoubleQuantBit),
        present_or_none(gu_offset, present & kGuDoubleQuantBit), present_or_none(d_scale, present & kDDoubleQuantBit),
        present_or_none(d_offset, present & kDDoubleQuantBit));
    ctx->save_for_backward({hidden, index, weights, gu_packed, gu_absmax, d_packed, d_absmax, gu_bias, d_bias, gu_A,
                            gu_B, d_A, d_B, gu_scale, gu_offset, d_scale, d_offset, gate_up_out});
    ctx->saved_data["present"] = present;
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["gu_scaling"] = gu_scaling;
    ctx->saved_data["d_scaling"] = d_scaling;
    ctx->saved_data["act_alpha"] = act_alpha;
    ctx->saved_data["act_limit"] = act_limit;
    ctx->saved_data["quant_type"] = quant_type;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto backward_op = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("moequant::experts_backward", "")
                                  .typed<decltype(experts_backward_cpu)>();
    const variable_list s = ctx->get_saved_variables();
    at::Tensor grad = grad_outputs[0];
    if (!grad.defined()) grad = at::zeros_like(s[kHidden]);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const std::string quant_type = ctx->saved_data["quant_type"].toStringRef();
    const int64_t present = ctx->saved_data["present"].toInt();
    const bool has_gu_lora = present & kGuLoraBit, has_d_lora = present & kDLoraBit;
    auto [g_hidden, g_weights, g_guA, g_guB, g_dA, g_dB] = backward_op.call(
        grad.contiguous(), s[kHidden], s[kIndex], s[kWeights], std::optional<at::Tensor>(s[kGateUpOut]),
        s[kGuPacked], s[kGuAbsmax], s[kDPacked], s[kDAbsmax], ctx->saved_data["blocksize"].toInt(), activation,
        ctx->saved_data["transposed"].toBool(), ctx->saved_data["interleaved"].toBool(),
        present_or_none(s[kGuBias], present & kGuBiasBit), present_or_none(s[kDBias], present & kDBiasBit),
        present_or_none(s[kGuA], has_gu_lora), present_or_none(s[kGuB], has_gu_lora),
        ctx->saved_data["gu_scaling"].toDouble(), present_or_none(s[kDA], has_d_lora),
        present_or_none(s[kDB], has_d_lora), ctx->saved_data["d_scaling"].toDouble(),
        ctx->saved_data["act_alpha"].toDouble(), ctx->saved_data["act_limit"].toDouble(), quant_type,
        present_or_none(s[kGuScale], present & kGuDoubleQuantBit),
        present_or_none(s[kGuOffset], present & kGuDoubleQuantBit),
        present_or_none(s[kDScale], present & kDDoubleQuantBit),
        present_or_none(s[kDOffset], present & kDDoubleQuantBit));
    const at::Tensor none;
    // One entry per forward() argument after ctx.
    return {g_hidden, none, g_weights, none, none, none, none, none, none, none, none, none, none,
            has_gu_lora ? g_guA : none, has_gu_lora ? g_guB : none, none,
            has_d_lora ? g_dA : none, has_d_lora ? g_dB : none, none, none, none,
            none, none, none, none, none, none};
  }
};

at::Tensor experts_forward_autograd(const at::Tensor& hidden_states, const at::Tensor& top_k_index,
                                    const at::Tensor& top_k_weights, MOEQUANT_EXPERTS_PARAMS) {
  auto requires_grad = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (hidden_states.requires_grad() || top_k_weights.requires_grad() ||
                           requires_grad(gate_up_lora_A) || requires_grad(gate_up_lora_B) ||
                           requires_grad(down_lora_A) || requires_grad(down_lora_B));
  if (!needs_grad) {
    // Inference: the plain forward, which keeps nothing for backward.
    static auto forward_op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("moequant::experts_forward", "")
                                 .typed<decltype(experts_forward_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op.call(hidden_states, top_k_index, top_k_weights, MOEQUANT_EXPERTS_ARG_NAMES);
  }
  const at::Tensor& like = hidden_states;
  const int64_t present =
      (gate_up_bias.has_value() ? kGuBiasBit : 0) | (down_bias.has_value() ? kDBiasBit : 0) |
      (gate_up_lora_A.has_value() ? kGuLoraBit : 0) | (down_lora_A.has_value() ? kDLoraBit : 0) |
      (gate_up_absmax_scale.has_value() ? kGuDoubleQuantBit : 0) |
      (down_absmax_scale.has_value() ? kDDoubleQuantBit : 0);
  // A stack's scale and offset travel together (the kernels' checks reject one without the other).
  auto pair_part = [&](const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& partner) {
    return t.has_value() && partner.has_value() ? *t : at::empty({0}, like.options());
  };
  TORCH_CHECK(gate_up_absmax_scale.has_value() == gate_up_absmax_offset.has_value(),
              "moequant.experts_forward: gate_up_absmax_scale and gate_up_absmax_offset must be given together");
  TORCH_CHECK(down_absmax_scale.has_value() == down_absmax_offset.has_value(),
              "moequant.experts_forward: down_absmax_scale and down_absmax_offset must be given together");
  return ExpertsForward::apply(
      hidden_states, top_k_index, top_k_weights, gate_up_packed, gate_up_absmax, down_packed, down_absmax, blocksize,
      std::string(activation), transposed, interleaved, tensor_or_placeholder(gate_up_bias, like),
      tensor_or_placeholder(down_bias, like), tensor_or_placeholder(gate_up_lora_A, like),
      tensor_or_placeholder(gate_up_lora_B, like), gate_up_lora_scaling, tensor_or_placeholder(down_lora_A, like),
      tensor_or_placeholder(down_lora_B, like), down_lora_scaling, act_alpha, act_limit, std::string(quant_type),
      pair_part(gate_up_absmax_scale, gate_up_absmax_offset), pair_part(gate_up_absmax_offset, gate_up_absmax_scale),
      pair_part(down_absmax_scale, down_absmax_offset), pair_part(down_absmax_offset, down_absmax_scale), present);
}

}  // namespace
}  // namespace moequant

TORCH_LIBRARY_IMPL(moequant, Autograd, m) {
  m.impl("experts_forward", &moequant::experts_forward_autograd);
}
