#include "core/selector.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

namespace reasonalloc {
namespace {

using ::testing::ElementsAre;

std::vector<int32_t> Select(std::vector<float> scores, int n, int budget, int window) {
  std::vector<int32_t> kept;
  const int count = SelectHead(scores, n, budget, window, &kept);
  EXPECT_EQ(count, static_cast<int>(kept.size()));
  return kept;
}

TEST(Selector, KeepsEverythingWhenWithinBudget) {
  EXPECT_THAT(Select({0.1f, 0.2f}, 4, 4, 2), ElementsAre(0, 1, 2, 3));
  EXPECT_THAT(Select({}, 3, 9, 8), ElementsAre(0, 1, 2));
  EXPECT_TRUE(Select({}, 0, 9, 8).empty());
}

TEST(Selector, TopScoresPlusWindowAscending) {
  // 6 candidates + window 2, budget 5: top 3 of [.5 .1 .9 .3 .8 .2] are 2, 4, 0.
  EXPECT_THAT(Select({0.5f, 0.1f, 0.9f, 0.3f, 0.8f, 0.2f}, 8, 5, 2), ElementsAre(0, 2, 4, 6, 7));
}

TEST(Selector, TiesGoToTheLowerIndex) {
  EXPECT_THAT(Select({1, 1, 1, 1}, 6, 4, 2), ElementsAre(0, 1, 4, 5));
  // Two tied for the last slot (index 1 and 3 at 0.5): the lower one wins.
  EXPECT_THAT(Select({0.9f, 0.5f, 0.1f, 0.5f}, 5, 3, 1), ElementsAre(0, 1, 4));
}

TEST(Selector, NanRanksBelowEveryNumber) {
  EXPECT_THAT(Select({std::nanf(""), -1e30f, std::nanf("")}, 4, 2, 1), ElementsAre(1, 3));
}

}  // namespace
}  // namespace reasonalloc
