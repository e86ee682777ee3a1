// Operator schemas of the moequant library (DESIGN.md §3). Kernels are registered per backend
// in register_cpu.cpp, register_cuda.cpp, meta.cpp and autograd.cpp.
#include <torch/library.h>

// The arguments every experts op shares after its leading tensors (see moequant/reference.py
// for the exact math): the two packed stacks, layout/activation options, optional biases,
// optional per-expert LoRA factors A [E, r, in], B [E, out, r], and the storage format: one
// quant_type for both stacks, and per stack optional double-quantized statistics (a stack's
// absmax is uint8 codes exactly when its absmax_scale/absmax_offset are given).
#define MOEQUANT_EXPERTS_ARGS                                                              \
  "Tensor gate_up_packed, Tensor gate_up_absmax, Tensor down_packed, Tensor down_absmax, " \
  "int blocksize=64, str activation=\"silu\", bool transposed=False, "                    \
  "bool interleaved=False, Tensor? gate_up_bias=None, Tensor? down_bias=None, "           \
  "Tensor? gate_up_lora_A=None, Tensor? gate_up_lora_B=None, float gate_up_lora_scaling=1.0, " \
  "Tensor? down_lora_A=None, Tensor? down_lora_B=None, float down_lora_scaling=1.0, "     \
  "float act_alpha=1.702, float act_limit=7.0, str quant_type=\"nf4\", "                  \
  "Tensor? gate_up_absmax_scale=None, Tensor? gate_up_absmax_offset=None, "                \
  "Tensor? down_absmax_scale=None, Tensor? down_absmax_offset=None"

TORCH_LIBRARY(moequant, m) {
  // weight [..., N, K] -> nf4/fp4: uint8 [..., N, K/2] + fp32 absmax [..., N*K/blocksize];
  // int8: int8 [..., N, K] + fp32 row absmax [..., N] (blocksize ignored).
  m.def("quantize_nf4(Tensor weight, int blocksize=64, str quant_type=\"nf4\") -> (Tensor packed, Tensor absmax)");
  // Double quantization of 4-bit statistics, per matrix: fp32 absmax [..., nb] -> uint8 codes
  // [..., nb], fp32 absmax_scale [..., ceil(nb/256)], fp32 absmax_offset [...].
  m.def("compress_statistics(Tensor absmax) -> (Tensor absmax, Tensor absmax_scale, Tensor absmax_offset)");
  m.def(
      "dequant_expert(Tensor packed, Tensor absmax, int blocksize, ScalarType dtype, int? expert=None, "
      "str quant_type=\"nf4\", Tensor? absmax_scale=None, Tensor? absmax_offset=None) -> Tensor");
  m.def("experts_forward(Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, " MOEQUANT_EXPERTS_ARGS
        ") -> Tensor");
  // Forward that also returns the gate_up projection output [T*k, gate_up_out_features] in
  // routing order (pairs sorted by expert, stable), which experts_backward reuses instead of
  // recomputing the first GEMM. Called by the autograd kernel when a gradient is needed.
  m.def("_experts_forward_train(Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, " MOEQUANT_EXPERTS_ARGS
        ") -> (Tensor out, Tensor gate_up_out)");
  m.def("experts_backward(Tensor grad_out, Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, "
        "Tensor? gate_up_out, " MOEQUANT_EXPERTS_ARGS
        ") -> (Tensor grad_hidden_states, Tensor grad_top_k_weights, Tensor grad_gate_up_lora_A, "
        "Tensor grad_gate_up_lora_B, Tensor grad_down_lora_A, Tensor grad_down_lora_B)");
}
