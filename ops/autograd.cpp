// Autograd of experts_forward: its backward is experts_backward. Registered at the Autograd key
// so eager autograd, torch.compile/AOTAutograd and C++ callers all get the same formula.
// Saved for backward: the inputs (packed stacks are frozen and held anyway) and the gate_up
// projection output — never a dequantized weight; experts_backward recomputes those.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

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

class ExpertsForward : public torch::autograd::Function<ExpertsForward> {
 public:
  // Tensor inputs in schema order (optional ones may be undefined).
  enum Input { kHidden, kIndex, kWeights, kGuPacked, kGuAbsmax, kDPacked, kDAbsmax, kGuBias, kDBias,
               kGuA, kGuB, kDA, kDB, kNumInputs };

  static at::Tensor forward(AutogradContext* ctx, at::Tensor hidden, at::Tensor index, at::Tensor weights,
                            at::Tensor gu_packed, at::Tensor gu_absmax, at::Tensor d_packed, at::Tensor d_absmax,
                            int64_t blocksize, std::string activation, bool transposed, bool interleaved,
                            at::Tensor gu_bias, at::Tensor d_bias, at::Tensor gu_A, at::Tensor gu_B,
                            double gu_scaling, at::Tensor d_A, at::Tensor d_B, double d_scaling, double act_alpha,
                            double act_limit, int64_t present_mask) {
    // Bits of present_mask: gu_bias, d_bias, gu_lora, d_lora.
    const bool present[4] = {(present_mask & 1) != 0, (present_mask & 2) != 0, (present_mask & 4) != 0,
                             (present_mask & 8) != 0};
    auto opt_bias_gu = present_or_none(gu_bias, present[0]);
    auto opt_bias_d = present_or_none(d_bias, present[1]);
    auto opt_gu_A = present_or_none(gu_A, present[2]), opt_gu_B = present_or_none(gu_B, present[2]);
    auto opt_d_A = present_or_none(d_A, present[3]), opt_d_B = present_or_none(d_B, present[3]);
    static auto train_op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("moequant::_experts_forward_train", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                   c10::string_view, bool, bool, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, double, double, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, gate_up_out] =
        train_op.call(hidden, index, weights, gu_packed, gu_absmax, d_packed, d_absmax, blocksize, activation,
                      transposed, interleaved, opt_bias_gu, opt_bias_d, opt_gu_A, opt_gu_B, gu_scaling, opt_d_A,
                      opt_d_B, d_scaling, act_alpha, act_limit);
    ctx->save_for_backward({hidden, index, weights, gu_packed, gu_absmax, d_packed, d_absmax, gu_bias, d_bias,
                            gu_A, gu_B, d_A, d_B, gate_up_out});
    ctx->saved_data["present"] = present_mask;
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["gu_scaling"] = gu_scaling;
    ctx->saved_data["d_scaling"] = d_scaling;
    ctx->saved_data["act_alpha"] = act_alpha;
    ctx->saved_data["act_limit"] = act_limit;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto backward_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("moequant::experts_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, int64_t, c10::string_view, bool, bool, const std::optional<at::Tensor>&,
                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
                const std::optional<at::Tensor>&, double, double, double)>();
    const variable_list s = ctx->get_saved_variables();
    at::Tensor grad = grad_outputs[0];
    if (!grad.defined()) grad = at::zeros_like(s[kHidden]);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const int64_t mask = ctx->saved_data["present"].toInt();
    const bool present[4] = {(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0, (mask & 8) != 0};
    const bool has_gu_lora = present[2], has_d_lora = present[3];
    auto [g_hidden, g_weights, g_guA, g_guB, g_dA, g_dB] = backward_op.call(
        grad.contiguous(), s[kHidden], s[kIndex], s[kWeights], std::optional<at::Tensor>(s[kNumInputs]), s[kGuPacked], s[kGuAbsmax],
        s[kDPacked], s[kDAbsmax], ctx->saved_data["blocksize"].toInt(), activation,
        ctx->saved_data["transposed"].toBool(), ctx->saved_data["interleaved"].toBool(),
        present_or_none(s[kGuBias], present[0]), present_or_none(s[kDBias], present[1]),
        present_or_none(s[kGuA], has_gu_lora), present_or_none(s[kGuB], has_gu_lora),
        ctx->saved_data["gu_scaling"].toDouble(), present_or_none(s[kDA], has_d_lora),
        present_or_none(s[kDB], has_d_lora), ctx->saved_data["d_scaling"].toDouble(), ctx->saved_data["act_alpha"].toDouble(),
        ctx->saved_data["act_limit"].toDouble());
    const at::Tensor none;
    // One entry per forward() argument after ctx.
    return {g_hidden, none, g_weights, none, none, none, none, none, none, none, none, none, none,
            has_gu_lora ? g_guA : none, has_gu_lora ? g_guB : none, none,
            has_d_lora ? g_dA : none, has_d_lora ? g_dB : none, none, none, none, none};
  }
};

at::Tensor experts_forward_autograd(const at::Tensor& hidden, const at::Tensor& index, const at::Tensor& weights,
                                    const at::Tensor& gu_packed, const at::Tensor& gu_absmax,
                                    const at::Tensor& d_packed, const at::Tensor& d_absmax, int64_t blocksize,
                                    c10::string_view activation, bool transposed, bool interleaved,
                                    const std::optional<at::Tensor>& gu_bias, const std::optional<at::Tensor>& d_bias,
                                    const std::optional<at::Tensor>& gu_A, const std::optional<at::Tensor>& gu_B,
                                    double gu_scaling, const std::optional<at::Tensor>& d_A,
                                    const std::optional<at::Tensor>& d_B, double d_scaling, double act_alpha,
                                    double act_limit) {
  auto requires_grad = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (hidden.requires_grad() || weights.requires_grad() || requires_grad(gu_A) ||
                           requires_grad(gu_B) || requires_grad(d_A) || requires_grad(d_B));
  if (!needs_grad) {
    // Inference: the plain forward, which keeps nothing for backward.
    static auto forward_op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("moequant::experts_forward", "")
                                 .typed<decltype(experts_forward_autograd)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op.call(hidden, index, weights, gu_packed, gu_absmax, d_packed, d_absmax, blocksize, activation,
                           transposed, interleaved, gu_bias, d_bias, gu_A, gu_B, gu_scaling, d_A, d_B, d_scaling,
                           act_alpha, act_limit);
  }
  return ExpertsForward::apply(hidden, index, weights, gu_packed, gu_absmax, d_packed, d_absmax, blocksize,
                               std::string(activation), transposed, interleaved, tensor_or_placeholder(gu_bias, hidden),
                               tensor_or_placeholder(d_bias, hidden), tensor_or_placeholder(gu_A, hidden),
                               tensor_or_placeholder(gu_B, hidden), gu_scaling, tensor_or_placeholder(d_A, hidden),
                               tensor_or_placeholder(d_B, hidden), d_scaling, act_alpha, act_limit,
                               int64_t{gu_bias.has_value()} | int64_t{d_bias.has_value()} << 1 |
                                   int64_t{gu_A.has_value()} << 2 | int64_t{d_A.has_value()} << 3);
}

}  // namespace
}  // namespace moequant

TORCH_LIBRARY_IMPL(moequant, Autograd, m) {
  m.impl("experts_forward", &moequant::experts_forward_autograd);
}
