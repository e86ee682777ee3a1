// Gated activations of the experts MLP, written with ATen ops so every backend can use them:
// [S, 2I] gate_up output -> [S, I], and the matching backward. See moequant/reference.py.
#pragma once

#include <ATen/ATen.h>

#include "experts_checks.h"

namespace moequant {

struct GateUpSplit {
  at::Tensor gate;  // [S, I] views of the gate_up output
  at::Tensor up;
};

// Gate and up halves: the first/second half of the features, or even/odd columns when
// `interleaved` (gpt-oss).
GateUpSplit split_gate_up(const at::Tensor& gate_up, bool interleaved);

at::Tensor gated_activation_forward(const at::Tensor& gate_up, GatedActivation act, bool interleaved,
                                    double alpha, double limit);

// Gradient w.r.t. the gate_up output [S, 2I], given the gradient w.r.t. the activation [S, I].
at::Tensor gated_activation_backward(const at::Tensor& gate_up, const at::Tensor& grad_act,
                                     GatedActivation act, bool interleaved, double alpha, double limit);

}  // namespace moequant
