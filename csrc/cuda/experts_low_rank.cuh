// Low-rank (LoRA) terms of the experts products, added in place to the routing-order rows of a
// product: never a whole [R, out] term in memory, and no GEMM for the second factor, whose rank
// is small enough for one elementwise pass.
#pragma once

#include <ATen/ATen.h>

#include "experts_routing.cuh"

namespace moequant {

// The term scale * u[rows of e] @ mats[e] of one product (LoRA: u = x A^T, mats = B^T).
struct LowRankTerm {
  at::Tensor u;     // [R, rank], the product's dtype, unit column stride; undefined when absent
  at::Tensor mats;  // [E, rank, out_dim], the product's dtype, contiguous
  float scale = 1.0f;
  bool present() const { return u.defined(); }
};

// rows[i] += scale * u[i] @ mats[expert of row i] for the routing-order rows `rows` ([R, out_dim],
// the term's dtype, unit column stride), summed in fp32 and rounded once.
void add_low_rank_rows(at::Tensor& rows, const LowRankTerm& term, const ExpertsRouting& routing);

}  // namespace moequant
