#include "experts_tile_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace moequant {
namespace {

// The shortest height that holds `rows` (at most kTallestTile).
int height_index_for(int64_t rows) {
  int h = 0;
  while (h + 1 < kNumTileHeights && kTileHeights[h] < rows) ++h;
  return h;
}

}  // namespace

TilePlanRule tile_plan_rule_from_env() {
  const char* v = std::getenv("MOEQUANT_TILE_PLAN");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "decode_once") == 0) return TilePlanRule::kDecodeOnce;
  TORCH_CHECK(std::strcmp(v, "mean") == 0, "MOEQUANT_TILE_PLAN must be 'decode_once' (default) or 'mean', got '",
              v, "'");
  return TilePlanRule::kMeanHeight;
}

// Why decode once: the fused kernels are bound by decoding weights, not by the tensor cores. ncu
// on an H200 (mixtral-8x7b shapes, T=256, about 64 rows per expert): a CTA of 16 rows costs as
// much as one of 64, and the remainder tiles of the mean-height plan (experts with 65-80 rows
// decode their weights twice, in a second launch of less than a wave) took 30% of the products'
// time. Each expert gets its own height rather than the largest expert's: a 128-row wgmma CTA
// costs about 1.5x a 64-row one, so moving every expert of that run to 128 rows gained nothing.
TilePlan plan_row_tiles(const std::vector<int64_t>& row_offsets, const std::vector<int32_t>& active_experts,
                        TilePlanRule rule) {
  int full = kNumTileHeights - 1;  // the full tiles' height, as an index into kTileHeights
  if (rule == TilePlanRule::kMeanHeight) {
    int64_t total_rows = 0;
    for (const int32_t e : active_experts) total_rows += row_offsets[e + 1] - row_offsets[e];
    const int64_t active = std::max<int64_t>(1, static_cast<int64_t>(active_experts.size()));
    full = height_index_for((total_rows + active - 1) / active);
  }
  std::vector<RowTile> lists[kNumTileHeights];
  const int64_t bm = kTileHeights[full];
  for (const int32_t e : active_experts) {
    int64_t row = row_offsets[e];
    const int64_t end = row_offsets[e + 1];
    for (; end - row >= bm; row += bm) {
      lists[full].push_back({e, static_cast<int32_t>(row), static_cast<int32_t>(row + bm), 0});
    }
    if (row < end) {
      lists[height_index_for(end - row)].push_back({e, static_cast<int32_t>(row), static_cast<int32_t>(end), 0});
    }
  }
  TilePlan plan;
  for (int h = 0; h < kNumTileHeights; ++h) {
    plan.begin[h] = static_cast<int64_t>(plan.tiles.size());
    plan.tiles.insert(plan.tiles.end(), lists[h].begin(), lists[h].end());
  }
  plan.begin[kNumTileHeights] = static_cast<int64_t>(plan.tiles.size());
  return plan;
}

}  // namespace moequant
