// Products with a quantized expert stack (NF4, FP4 or int8; plain or double-quantized
// statistics). Few rows per expert (bf16/fp16, 4-bit formats): rung (b), the fused 4-bit GEMM
// (experts_nf4_gemm.cuh). Otherwise, and for every int8 stack, rung (a) of DESIGN.md §4, chunk by
// chunk: each chunk of experts (or a row slice of one expert too large for the budget) is
// dequantized into a bounded scratch buffer (dequant_matrices.cuh, every format), then
// multiplied with torch._grouped_mm (bf16, sm90) or cuBLAS. Only experts that received rows are
// dequantized.
#pragma once

#include <ATen/ATen.h>

#include "dequant_matrices.cuh"
#include "experts_low_rank.cuh"
#include "experts_routing.cuh"

namespace moequant {

// One quantized stack: logical [E, N, K] stored as packed uint8 [E, N, K/2] (NF4/FP4) or int8
// [E, N, K], with plain fp32 absmax [E, blocks] or double-quantized statistics (uint8 codes
// [E, blocks], fp32 absmax_scale [E, groups], absmax_offset [E]). Tensors are contiguous (and
// the codes 16-byte aligned): kernels take raw pointers from view().
struct PackedStack {
  at::Tensor packed;
  at::Tensor absmax;
  at::Tensor absmax_scale, absmax_offset;  // double quant; undefined otherwise
  QuantType type = QuantType::kNF4;
  int64_t experts = 0, rows = 0, cols = 0, blocksize = 64;  // E, N, K, B

  bool double_quant() const { return absmax_scale.defined(); }
  // Device pointers, codebook and statistics layout for the kernels.
  QuantStackView view() const;
};

// The dequant scratch budget of one experts call: 5% of the layer's two stacks at bf16 (never
// below 8 MiB unless the layer is smaller), which a product may raise to give its chunks enough
// rows to fill the GPU (plan_chunks). MOEQUANT_EXPERTS_SCRATCH_BYTES sets it exactly (`fixed`:
// tests use it to force row slicing, benchmarks to compare budgets).
struct ScratchBudget {
  int64_t bytes = 0;
  bool fixed = false;
};
ScratchBudget experts_scratch_budget(const PackedStack& gate_up, const PackedStack& down);

// out[rows of e] = in[rows of e] @ M_e (+ the low-rank term) for every expert with rows, where
// M_e is the dequantized stored matrix S_e [N, K] (`transpose_stored` = false: in [R, N] -> out
// [R, K]) or its transpose (`transpose_stored` = true: in [R, K] -> out [R, N]). Computes in in's
// dtype; `out` must be a contiguous [R, out_dim] tensor of that dtype; it is fully overwritten.
// The low-rank term is added in place once the product is written, never materialized whole
// (experts_low_rank.cuh).
void packed_stack_gemm(const at::Tensor& in, at::Tensor& out, const PackedStack& w, bool transpose_stored,
                       const ExpertsRouting& routing, const ScratchBudget& scratch,
                       const LowRankTerm& low_rank = {});

}  // namespace moequant
