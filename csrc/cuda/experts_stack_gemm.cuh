// Products with a packed NF4 expert stack. Few rows per expert (bf16/fp16): rung (b), the fused
// NF4 GEMM (experts_nf4_gemm.cuh). Otherwise rung (a) of DESIGN.md §4, chunk by chunk: each
// chunk of experts (or a row slice of one expert too large for the budget) is dequantized into a
// bounded scratch buffer, then multiplied with torch._grouped_mm (bf16, sm90) or cuBLAS. Only
// experts that received rows are dequantized.
#pragma once

#include <ATen/ATen.h>

#include "experts_low_rank.cuh"
#include "experts_routing.cuh"

namespace moequant {

// One packed stack: logical [E, N, K] stored as packed uint8 [E, N, K/2] + absmax [E, N*K/B].
struct PackedStack {
  at::Tensor packed;
  at::Tensor absmax;
  int64_t experts = 0, rows = 0, cols = 0, blocksize = 64;  // E, N, K, B
};

// Scratch bytes for one experts call: 5% of the layer's two stacks at bf16 (never below 8 MiB
// unless the layer is smaller). MOEQUANT_EXPERTS_SCRATCH_BYTES overrides it (tests use it to
// force row slicing).
int64_t experts_scratch_bytes(const PackedStack& gate_up, const PackedStack& down);

// out[rows of e] = in[rows of e] @ M_e (+ the low-rank term) for every expert with rows, where
// M_e is the dequantized stored matrix S_e [N, K] (`transpose_stored` = false: in [R, N] -> out
// [R, K]) or its transpose (`transpose_stored` = true: in [R, K] -> out [R, N]). Computes in in's
// dtype; `out` must be a contiguous [R, out_dim] tensor of that dtype; it is fully overwritten.
// The low-rank term is added in place once the product is written, never materialized whole
// (experts_low_rank.cuh).
void packed_stack_gemm(const at::Tensor& in, at::Tensor& out, const PackedStack& w, bool transpose_stored,
                       const ExpertsRouting& routing, int64_t scratch_bytes, const LowRankTerm& low_rank = {});

}  // namespace moequant
