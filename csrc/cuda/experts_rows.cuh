// Moving rows between token order [T, D] and routing order [R, D] (see experts_routing.cuh).
#pragma once

#include <ATen/ATen.h>

#include "experts_routing.cuh"

namespace moequant {

// dst[i] = src[sorted_pair[i] / k] for the R routed rows: [T, D] -> [R, D], same dtype.
at::Tensor gather_rows(const at::Tensor& src, const ExpertsRouting& routing);

// out[t] = sum_j weight[t, j] * (rows[pos] + bias[e]) over the k slots (t, j) in order
// j = 0..k-1 (deterministic, fp32 accumulation), sentinel slots skipped. `pair_weights` is
// float32 [P] or undefined (weight 1); float32 `bias` [E, D] may be undefined. Returns [T, D] in
// `out_dtype`.
at::Tensor combine_rows(const at::Tensor& rows, const ExpertsRouting& routing, const at::Tensor& pair_weights, const at::Tensor& bias,
                        int64_t num_tokens, at::ScalarType out_dtype);

}  // namespace moequant
