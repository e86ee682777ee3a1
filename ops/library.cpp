// Operator schemas of the moequant library (DESIGN.md §3). Kernels are registered per backend
// in register_cpu.cpp, register_cuda.cpp, meta.cpp and autograd.cpp.
#include <torch/library.h>

// The arguments every experts op shares after its leading tensors (see moequant/reference.py
// for the exact math): the two packed stacks, layout/activation options, optional biases and
// optional per-expert LoRA factors A [E, r, in], B [E, out, r].
#define MOEQUANT_EXPERTS_ARGS                                                              \
  "Tensor gate_up_packed, Tensor gate_up_absmax, Tensor down_packed, Tensor down_absmax, " \
  "int blocksize=64, str activation=\"silu\", bool transposed=False, "                    \
  "bool interleaved=False, Tensor? gate_up_bias=None, Tensor? down_bias=None, "           \
  "Tensor? gate_up_lora_A=None, Tensor? gate_up_lora_B=None, float gate_up_lora_scaling=1.0, " \
  "Tensor? down_lora_A=None, Tensor? down_lora_B=None, float down_lora_scaling=1.0, "     \
  "float act_alpha=1.702, float act_limit=7.0"

TORCH_LIBRARY(moequant, m) {
  m.def("quantize_nf4(Tensor weight, int blocksize=64) -> (Tensor packed, Tensor absmax)");
  m.def(
      "dequant_expert(Tensor packed, Tensor absmax, int blocksize, ScalarType dtype, "
      "int? expert=None) -> Tensor");
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
