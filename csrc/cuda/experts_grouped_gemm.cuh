// Per-expert matrix products over routing-order rows with small dense per-expert matrices (LoRA
// factors): torch._grouped_mm where it runs (bf16 on sm90/sm100), else one cuBLAS mm per expert.
#pragma once

#include <ATen/ATen.h>

#include "experts_routing.cuh"

namespace moequant {

// Whether torch._grouped_mm should be tried for `dtype` on the current device. Set
// MOEQUANT_EXPERTS_GROUPED_MM=0 to force the per-expert cuBLAS path (tests use it).
bool grouped_mm_enabled(at::ScalarType dtype);

// Whether torch._grouped_mm accepts a and b (2-D or 3-D, bf16): each matrix row- or
// column-major with 16-byte aligned leading strides, sizes and data. Otherwise callers use one
// cuBLAS product per expert (e.g. LoRA ranks that are not multiples of 8).
bool grouped_mm_operands_ok(const at::Tensor& a, const at::Tensor& b);

// out = a @ b[g] for the rows of group g of a [M, K] (group ends `offs`, int32 [G]), b [G, K, N],
// written straight into `out` ([M, N], row-major; a view of a larger buffer is fine) by torch's
// CUTLASS grouped kernel where its entry point is exported, else through torch._grouped_mm and a
// copy. Needs grouped_mm_enabled and grouped_mm_operands_ok(a, b).
void grouped_mm_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs, at::Tensor& out);

// out[rows of e] = in[rows of e] @ mats[e]: in [R, K], mats [E, K, N] (any strides) -> [R, N].
at::Tensor stack_rows_gemm(const at::Tensor& in, const at::Tensor& mats, const ExpertsRouting& routing);

// out[e] = a[rows of e]^T @ b[rows of e]: a [R, M], b [R, N] -> [E, M, N], zero for experts
// with no rows (the reduction over rows behind LoRA weight gradients; deterministic).
at::Tensor stack_weight_grad(const at::Tensor& a, const at::Tensor& b, const ExpertsRouting& routing);

}  // namespace moequant
