#include "gated_activation.h"

namespace moequant {

GateUpSplit split_gate_up(const at::Tensor& gate_up, bool interleaved) {
  const int64_t features = gate_up.size(-1);
  if (interleaved) {
    return {gate_up.slice(-1, 0, features, 2), gate_up.slice(-1, 1, features, 2)};
  }
  return {gate_up.narrow(-1, 0, features / 2), gate_up.narrow(-1, features / 2, features / 2)};
}

// gpt-oss' clamped SwiGLU pieces: clamped gate/up and glu = g * sigmoid(alpha * g).
struct SwigluOai {
  at::Tensor gate_clamped, up_clamped, sig, glu;
};

static SwigluOai swiglu_oai_parts(const GateUpSplit& s, double alpha, double limit) {
  SwigluOai p;
  p.gate_clamped = s.gate.clamp_max(limit);
  p.up_clamped = s.up.clamp(-limit, limit);
  p.sig = at::sigmoid(p.gate_clamped * alpha);
  p.glu = p.gate_clamped * p.sig;
  return p;
}

at::Tensor gated_activation_forward(const at::Tensor& gate_up, GatedActivation act, bool interleaved,
                                    double alpha, double limit) {
  const GateUpSplit s = split_gate_up(gate_up, interleaved);
  switch (act) {
    case GatedActivation::kSilu: return at::silu(s.gate) * s.up;
    case GatedActivation::kGelu: return at::gelu(s.gate) * s.up;
    case GatedActivation::kGeluTanh: return at::gelu(s.gate, "tanh") * s.up;
    case GatedActivation::kSwigluOai: {
      const SwigluOai p = swiglu_oai_parts(s, alpha, limit);
      return (p.up_clamped + 1) * p.glu;
    }
  }
  TORCH_CHECK(false, "moequant: unknown activation");
}

at::Tensor gated_activation_backward(const at::Tensor& gate_up, const at::Tensor& grad_act,
                                     GatedActivation act, bool interleaved, double alpha, double limit) {
  const GateUpSplit s = split_gate_up(gate_up, interleaved);
  at::Tensor grad_gate, grad_up;
  switch (act) {
    case GatedActivation::kSilu:
      grad_gate = at::silu_backward(grad_act * s.up, s.gate);
      grad_up = grad_act * at::silu(s.gate);
      break;
    case GatedActivation::kGelu:
      grad_gate = at::gelu_backward(grad_act * s.up, s.gate);
      grad_up = grad_act * at::gelu(s.gate);
      break;
    case GatedActivation::kGeluTanh:
      grad_gate = at::gelu_backward(grad_act * s.up, s.gate, "tanh");
      grad_up = grad_act * at::gelu(s.gate, "tanh");
      break;
    case GatedActivation::kSwigluOai: {
      const SwigluOai p = swiglu_oai_parts(s, alpha, limit);
      // d glu / d g = sig + g * alpha * sig * (1 - sig); clamp passes gradient where the
      // input lies inside its (inclusive) bounds, as torch.clamp's backward does.
      const at::Tensor dglu = p.sig + p.gate_clamped * alpha * p.sig * (1 - p.sig);
      grad_gate = grad_act * (p.up_clamped + 1) * dglu * s.gate.le(limit);
      grad_up = grad_act * p.glu * s.up.abs().le(limit);
      break;
    }
  }
  at::Tensor grad = at::empty_like(gate_up);
  const GateUpSplit g = split_gate_up(grad, interleaved);
  g.gate.copy_(grad_gate);
  g.up.copy_(grad_up);
  return grad;
}

}  // namespace moequant
