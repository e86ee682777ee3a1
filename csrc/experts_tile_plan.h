// Row tiles of the fused grouped GEMM (csrc/cuda/experts_nf4_gemm.cu): how each expert's
// routing-order rows are cut into CTA tiles of the heights the kernels are built for. Host-only
// C++ (no CUDA), so the C++ tests check it on any machine.
#pragma once

#include <cstdint>
#include <vector>

namespace moequant {

// Row-tile heights of the fused kernels, shortest first.
constexpr int kTileHeights[] = {16, 32, 64, 128};
constexpr int kNumTileHeights = 4;
constexpr int kTallestTile = kTileHeights[kNumTileHeights - 1];

// Rows [row_begin, min(row_begin + height, row_end)) of `expert`, in routing order. The device
// reads it as four int32 (16-byte aligned).
struct alignas(16) RowTile {
  int32_t expert, row_begin, row_end, unused;
};

// The CTA tiles of one product, one list per height: list h is tiles[begin[h], begin[h + 1])
// and holds tiles of kTileHeights[h] rows (its last rows may be padding).
struct TilePlan {
  std::vector<RowTile> tiles;
  int64_t begin[kNumTileHeights + 1] = {};
  int64_t count(int h) const { return begin[h + 1] - begin[h]; }
};

enum class TilePlanRule {
  // Each expert's weights decoded once where its rows allow: an expert with at most kTallestTile
  // rows gets one tile of the shortest height that holds them; a larger one, tiles of
  // kTallestTile rows and its remainder in the shortest height that holds it. The kernels launch
  // one height per list, concurrently (experts_nf4_gemm.cu).
  kDecodeOnce,
  // The rule before kDecodeOnce (MOEQUANT_TILE_PLAN=mean, for comparison in benchmarks): full
  // tiles of the shortest height that holds the mean rows per active expert, each remainder in
  // the shortest height that holds it; the lists launched one after the other.
  kMeanHeight,
};

// MOEQUANT_TILE_PLAN: "mean" selects kMeanHeight, unset or "decode_once" kDecodeOnce; anything
// else raises. Read on every call (benchmarks switch it within one process).
TilePlanRule tile_plan_rule_from_env();

// Tiles of the experts in `active_experts` (ascending, each with at least one row), whose rows
// are [row_offsets[e], row_offsets[e + 1]).
TilePlan plan_row_tiles(const std::vector<int64_t>& row_offsets, const std::vector<int32_t>& active_experts,
                        TilePlanRule rule);

}  // namespace moequant
