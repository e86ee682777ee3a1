// Argument checks and problem sizes of the experts ops, shared by the CPU, CUDA and Meta
// kernels so that every backend rejects the same inputs with the same message.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "kernels.h"
#include "quant_format.h"

namespace moequant {

enum class GatedActivation { kSilu, kGelu, kGeluTanh, kSwigluOai };

GatedActivation parse_activation(c10::string_view name);

// Sizes of one experts call. Symbolic so the Meta kernels trace with dynamic shapes.
struct ExpertsProblem {
  c10::SymInt tokens;        // T
  c10::SymInt top_k;         // k
  c10::SymInt hidden;        // H
  c10::SymInt intermediate;  // I (gate_up produces 2I features)
  c10::SymInt experts;       // E
  GatedActivation activation = GatedActivation::kSilu;
  QuantType quant_type = QuantType::kNF4;  // of both stacks
  bool gate_up_double_quant = false;       // uint8 statistics with scale/offset
  bool down_double_quant = false;
  bool has_gate_up_lora = false;
  bool has_down_lora = false;
};

// Validates every argument of experts_forward / _experts_forward_train / experts_backward
// (dtypes, ranks, shapes, devices, LoRA pairing) and returns the problem sizes.
ExpertsProblem check_experts_args(const char* op, const at::Tensor& hidden_states,
                                  const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                  MOEQUANT_EXPERTS_PARAMS);

}  // namespace moequant
