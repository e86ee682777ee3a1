// Rung (c) of DESIGN.md §4: the decode path. With few (token, slot) pairs every expert sees
// about one row, so a GEMM wastes its tiles; instead each pair runs a fused GEMV that reads the
// quantized weights directly (4-bit: a quarter of bf16's bytes; int8: half), with no routing sort
// and no scratch. With LoRA, u = A[e] x runs in a small kernel beside each GEMV (while the GEMV
// runs) and scaling * B[e] u in a small kernel after both, into the GEMV's sums.
#pragma once

#include <ATen/ATen.h>

#include "experts_activation.cuh"
#include "experts_stack_gemm.cuh"

namespace moequant {

// Whether the GEMV path serves `num_pairs` = T*k pairs (inference, any format, with or without
// LoRA, stored [out, in] layout with rows of whole 32-weight units): up to 64 pairs, or up to
// 65535 while the current stream is capturing a CUDA graph (the routed path cannot be captured).
// MOEQUANT_DECODE_MAX_PAIRS overrides the pair threshold (0 disables the path; tests use it).
bool decode_gemv_applies(int64_t num_pairs, bool transposed, const PackedStack& gate_up, const PackedStack& down);

// One projection's LoRA factors for the decode path: A [E, r, in] contiguous and 16-byte aligned,
// B [E, out, r] with any strides (PEFT's B is an expert-minor view), each in hidden's dtype or
// float32 (read as given and rounded to hidden's dtype in the kernels); undefined when the
// projection has none.
struct DecodeLora {
  at::Tensor A, B;
  double scaling = 1.0;
  bool present() const { return A.defined(); }
};

// experts_forward for few pairs: [T, H] in hidden's dtype. `top_k_weights` [T, k] in any float
// dtype (read as float32 in the combine, no cast kernel); biases float32 or undefined. No device ->
// host copy or sync: capturable in a CUDA graph.
at::Tensor decode_gemv_forward(const at::Tensor& hidden, const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                               const PackedStack& gate_up, const PackedStack& down, const ActivationSpec& act,
                               const at::Tensor& gate_up_bias, const at::Tensor& down_bias,
                               const DecodeLora& gate_up_lora, const DecodeLora& down_lora);

}  // namespace moequant
