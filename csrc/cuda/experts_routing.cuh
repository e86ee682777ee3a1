// Routing of the experts ops: sort the T*k (token, slot) pairs by expert id (stable, CUB radix
// sort), count rows per expert, and remember where each pair landed. Every other experts kernel
// works on rows in this "routing order".
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace moequant {

struct ExpertsRouting {
  int64_t num_pairs = 0;    // P = T * k
  int64_t top_k = 0;        // k
  int64_t num_experts = 0;  // E
  int64_t num_rows = 0;     // R: pairs routed to a real expert (id < E); the rest are sentinels
  at::Tensor sorted_pair;   // int32 [P]: pair index p = t*k + j at each routing-order position
  at::Tensor sorted_expert; // int32 [P]: expert id at each position (E for sentinels)
  at::Tensor pair_position; // int32 [P]: routing-order position of pair p (inverse permutation)
  at::Tensor expert_rows;   // int32 [E] on device: rows per expert
  at::Tensor group_ends;    // int32 [E] on device: cumulative row counts (torch._grouped_mm offs)
  std::vector<int64_t> row_offsets;  // host [E+1]: rows of expert e are [row_offsets[e], row_offsets[e+1])
  std::vector<int32_t> active_experts;  // host: experts with at least one row, ascending

  int64_t rows_of(int64_t e) const { return row_offsets[e + 1] - row_offsets[e]; }
};

// Sorts the pairs of `top_k_index` ([T, k], int32 or int64) by expert. Expert ids >= E are
// sentinels (sorted last, never computed); a negative id raises. Synchronizes once with the host
// to read the per-expert counts (the chunked GEMMs are planned on the host).
ExpertsRouting route_pairs(const char* op, const at::Tensor& top_k_index, int64_t num_experts);

}  // namespace moequant
