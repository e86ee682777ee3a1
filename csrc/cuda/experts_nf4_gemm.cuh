// Rung (b) of DESIGN.md §4: a grouped GEMM over routing-order rows that reads the quantized expert
// stack (4-bit or int8) directly. Each CTA owns one (expert, row tile, column tile) and walks the
// input dimension, decoding each k-tile of weights to the compute dtype on the fly (in registers or
// shared memory, never global memory) for the tensor cores. Weights are read once, as stored, and
// no dequantization scratch is allocated.
#pragma once

#include <ATen/ATen.h>

#include "experts_routing.cuh"
#include "experts_stack_gemm.cuh"

namespace moequant {

// Whether the fused kernel takes this product: any stack (NF4 or FP4, plain or double-quantized
// statistics; int8 unless MOEQUANT_INT8_FUSED_GEMM=0, read once per process, keeps it on the
// scratch rung), bf16/fp16 on sm80+, the input dimension a multiple of 64 and the output
// dimension a multiple of 32, and (unless MOEQUANT_EXPERTS_FUSED_GEMM=1 forces it, or =0 turns it
// off) few enough rows per active expert that the product is bound by weight traffic, where
// reading quantized weights once beats dequant scratch + cuBLAS (a higher bound on Hopper for the
// products whose 128-row tiles run on wgmma).
bool nf4_grouped_gemm_applies(const at::Tensor& in, const PackedStack& w, bool transpose_stored,
                              const ExpertsRouting& routing);

// The product of packed_stack_gemm (same contract), computed by the fused kernel.
void nf4_grouped_gemm(const at::Tensor& in, at::Tensor& out, const PackedStack& w, bool transpose_stored,
                      const ExpertsRouting& routing);

}  // namespace moequant
