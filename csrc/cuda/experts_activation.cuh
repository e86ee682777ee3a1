// Gated activation of the experts MLP on routing-order rows, fused with what surrounds it:
// the gate_up bias (forward) and the top_k_weights gradient (backward).
#pragma once

#include <ATen/ATen.h>

#include "../experts_checks.h"
#include "experts_routing.cuh"

namespace moequant {

struct ActivationSpec {
  GatedActivation kind = GatedActivation::kSilu;
  bool interleaved = false;  // gate/up in even/odd columns instead of halves
  float alpha = 1.702f;      // swiglu_oai only
  float limit = 7.0f;        // swiglu_oai only
};

// gate_up [R, 2I] (routing order, LoRA term included) += bias[e] in place (rounded to its dtype;
// float32 `bias` [E, 2I] may be undefined), then returns act(gate_up) [R, I] computed from the
// rounded values.
at::Tensor gate_up_bias_activation(at::Tensor& gate_up, const at::Tensor& bias, const ExpertsRouting& routing,
                                   const ActivationSpec& spec);

struct ActivationGrads {
  at::Tensor grad_gate_up;       // [R, 2I], dtype of gate_up
  at::Tensor grad_pair_weights;  // float32 [P] in pair order (0 for sentinel pairs)
  at::Tensor act;                // [R, I] when asked for (down LoRA needs it), else undefined
};

// Backward through the activation and the top-k weighting. `grad_act_unweighted` [R, I] is
// grad_out[t] @ W_down_eff[e] for each row (LoRA term included); the gradient w.r.t. the
// activation is that times the pair's weight. grad_pair_weights[p] = <grad_act_unweighted, act> + <grad_out[t], down_bias[e]>.
// `grad_out_rows` [R, H] and `down_bias` float32 [E, H] are only read when down_bias is defined.
// With want_act, act is written over grad_act_unweighted (the same storage, returned as `act`):
// the caller gives up that buffer's values, and the down LoRA's gradients cost no [R, I] buffer.
ActivationGrads gate_up_activation_backward(const at::Tensor& gate_up, at::Tensor& grad_act_unweighted,
                                            const at::Tensor& row_weights, const at::Tensor& grad_out_rows,
                                            const at::Tensor& down_bias, const ExpertsRouting& routing,
                                            const ActivationSpec& spec, bool want_act);

}  // namespace moequant
