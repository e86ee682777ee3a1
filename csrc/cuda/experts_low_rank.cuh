// Low-rank (LoRA) terms of the experts products, added in place to the routing-order rows of a
// product: never a whole [R, out] term in memory; the second factor's product is computed in the
// pass that adds it.
#pragma once

#include <ATen/ATen.h>

#include "experts_routing.cuh"

namespace moequant {

// The term scale * u[rows of e] @ mats[e]^T of one product (LoRA's forward: u = x A^T, mats = B).
struct LowRankTerm {
  at::Tensor u;     // [R, rank], the product's dtype, unit column stride; undefined when absent
  at::Tensor mats;  // [E, out_dim, rank], the product's dtype, contiguous
  float scale = 1.0f;
  bool present() const { return u.defined(); }
};

// rows[i] += scale * u[i] @ mats[expert of row i]^T for the routing-order rows `rows`
// ([R, out_dim], the term's dtype, unit column stride), summed in fp32 and rounded once (on the
// tensor cores for bf16/fp16).
void add_low_rank_rows(at::Tensor& rows, const LowRankTerm& term, const ExpertsRouting& routing);

}  // namespace moequant
