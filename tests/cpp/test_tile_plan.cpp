// The fused GEMM's row-tile plan (csrc/experts_tile_plan.h): every routed row in exactly one
// tile, tiles no taller than their list's height, and the decode-once rule's choice of heights.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "experts_tile_plan.h"

namespace {

using moequant::kNumTileHeights;
using moequant::kTileHeights;
using moequant::plan_row_tiles;
using moequant::RowTile;
using moequant::TilePlan;
using moequant::TilePlanRule;

struct Routing {
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> active;
};

Routing routing_of(const std::vector<int64_t>& rows_per_expert) {
  Routing r;
  for (size_t e = 0; e < rows_per_expert.size(); ++e) {
    r.offsets.push_back(r.offsets.back() + rows_per_expert[e]);
    if (rows_per_expert[e] > 0) r.active.push_back(static_cast<int32_t>(e));
  }
  return r;
}

// Every row of every expert is covered once, by a tile of that expert within its list's height.
void expect_covers(const TilePlan& plan, const Routing& r) {
  std::vector<int> seen(static_cast<size_t>(r.offsets.back()), 0);
  for (int h = 0; h < kNumTileHeights; ++h) {
    for (int64_t i = plan.begin[h]; i < plan.begin[h + 1]; ++i) {
      const RowTile& t = plan.tiles[i];
      ASSERT_LT(t.row_begin, t.row_end);
      ASSERT_LE(t.row_end - t.row_begin, kTileHeights[h]);
      ASSERT_GE(t.row_begin, r.offsets[t.expert]);
      ASSERT_LE(t.row_end, r.offsets[t.expert + 1]);
      for (int32_t row = t.row_begin; row < t.row_end; ++row) ++seen[row];
    }
  }
  for (size_t row = 0; row < seen.size(); ++row) EXPECT_EQ(seen[row], 1) << "row " << row;
}

std::vector<int64_t> tiles_per_height(const TilePlan& plan) {
  std::vector<int64_t> n;
  for (int h = 0; h < kNumTileHeights; ++h) n.push_back(plan.count(h));
  return n;
}

TEST(TilePlan, DecodeOnceGivesEachExpertOneTileOfItsOwnHeight) {
  // Mixtral-like T=256: about 64 rows per expert, some above.
  const Routing r = routing_of({58, 64, 70, 61, 75, 66, 52, 66});
  const TilePlan plan = plan_row_tiles(r.offsets, r.active, TilePlanRule::kDecodeOnce);
  expect_covers(plan, r);
  EXPECT_EQ(tiles_per_height(plan), (std::vector<int64_t>{0, 0, 4, 4}));
  for (int64_t i = plan.begin[3]; i < plan.begin[4]; ++i) EXPECT_GT(plan.tiles[i].row_end - plan.tiles[i].row_begin, 64);
  // The mean-height rule cuts the experts above 64 rows into a 64-row tile and a 16-row one.
  const TilePlan mean = plan_row_tiles(r.offsets, r.active, TilePlanRule::kMeanHeight);
  expect_covers(mean, r);
  EXPECT_EQ(tiles_per_height(mean), (std::vector<int64_t>{4, 0, 8, 0}));
}

TEST(TilePlan, DecodeOnceOnFewRows) {
  const Routing r = routing_of({3, 0, 17, 9, 0, 30, 1});
  const TilePlan plan = plan_row_tiles(r.offsets, r.active, TilePlanRule::kDecodeOnce);
  expect_covers(plan, r);
  EXPECT_EQ(tiles_per_height(plan), (std::vector<int64_t>{3, 2, 0, 0}));
  for (const RowTile& t : plan.tiles) EXPECT_NE(t.expert, 1) << "expert 1 has no rows";
  // Mean 12 rows: 16-row tiles, the 17- and 30-row experts in two each.
  const TilePlan mean = plan_row_tiles(r.offsets, r.active, TilePlanRule::kMeanHeight);
  expect_covers(mean, r);
  EXPECT_EQ(tiles_per_height(mean), (std::vector<int64_t>{7, 0, 0, 0}));
}

TEST(TilePlan, ExpertsBeyondTheTallestTileGetFullTilesAndOneRemainder) {
  const Routing r = routing_of({300, 129, 128, 5, 0, 40});
  const TilePlan plan = plan_row_tiles(r.offsets, r.active, TilePlanRule::kDecodeOnce);
  expect_covers(plan, r);
  // 300 = 2 x 128 + 44 (64-row tile), 129 = 128 + 1 (16), 128, 5 (16), 40 (64).
  EXPECT_EQ(tiles_per_height(plan), (std::vector<int64_t>{2, 0, 2, 4}));
}

TEST(TilePlan, EmptyRoutingHasNoTiles) {
  const Routing r = routing_of({0, 0, 0});
  for (const TilePlanRule rule : {TilePlanRule::kDecodeOnce, TilePlanRule::kMeanHeight}) {
    const TilePlan plan = plan_row_tiles(r.offsets, r.active, rule);
    EXPECT_TRUE(plan.tiles.empty());
    EXPECT_EQ(plan.begin[kNumTileHeights], 0);
  }
}

TEST(TilePlan, RuleFromTheEnvironment) {
  ::unsetenv("MOEQUANT_TILE_PLAN");
  EXPECT_EQ(moequant::tile_plan_rule_from_env(), TilePlanRule::kDecodeOnce);
  ::setenv("MOEQUANT_TILE_PLAN", "mean", 1);
  EXPECT_EQ(moequant::tile_plan_rule_from_env(), TilePlanRule::kMeanHeight);
  ::setenv("MOEQUANT_TILE_PLAN", "tallest", 1);
  try {
    moequant::tile_plan_rule_from_env();
    ADD_FAILURE() << "an unknown rule must raise";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("MOEQUANT_TILE_PLAN must be"), std::string::npos) << e.what();
  }
  ::unsetenv("MOEQUANT_TILE_PLAN");
}

}  // namespace
