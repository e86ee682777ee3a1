// Rung (c) of DESIGN.md §4: the decode path. With few (token, slot) pairs every expert sees
// about one row, so a GEMM wastes its tiles; instead each pair runs a fused 4-bit GEMV that reads
// the packed weights directly (a quarter of bf16's bytes), with no routing sort and no scratch.
#pragma once

#include <ATen/ATen.h>

#include "experts_activation.cuh"
#include "experts_stack_gemm.cuh"

namespace moequant {

// Whether the GEMV path serves `num_pairs` = T*k pairs (inference without LoRA; 4-bit stacks, int8
// ones take the grouped path; stored [out, in] layout with rows of whole 16-byte units).
// MOEQUANT_DECODE_MAX_PAIRS overrides the pair threshold (0 disables the path; tests use it).
bool decode_gemv_applies(int64_t num_pairs, bool transposed, const PackedStack& gate_up, const PackedStack& down);

// experts_forward for few pairs: [T, H] in hidden's dtype. `pair_weights` float32 [T*k];
// biases float32 or undefined.
at::Tensor decode_gemv_forward(const at::Tensor& hidden, const at::Tensor& top_k_index, const at::Tensor& pair_weights,
                               const PackedStack& gate_up, const PackedStack& down, const ActivationSpec& act,
                               const at::Tensor& gate_up_bias, const at::Tensor& down_bias);

}  // namespace moequant
