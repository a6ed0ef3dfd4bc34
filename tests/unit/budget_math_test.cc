// Hand-worked cases for the allocators' integer arithmetic (docs/algorithms.md §3 common rules,
// §3.4).
#include "core/budget_math.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <numeric>
#include <random>

namespace reasonalloc {
namespace {

using ::testing::ElementsAre;

TEST(RoundPreservingSum, LargestFractionsFirstTiesToTheLowerIndex) {
  const double x[] = {1.5, 1.5, 1.0};  // floors 1, 1, 1 = 3; one more to the tied .5s: the lower
  EXPECT_THAT(RoundPreservingSum(x, 4), ElementsAre(2, 1, 1));
  const double y[] = {0.2, 0.7, 2.1};  // floors 0, 0, 2; two more: .7 then .2
  EXPECT_THAT(RoundPreservingSum(y, 3), ElementsAre(0, 1, 2));
  EXPECT_THAT(RoundPreservingSum(y, 4), ElementsAre(1, 1, 2));
  const double z[] = {1.0000004, 1.0000001, 0.9999999};  // fractions within 1e-6: ties
  EXPECT_THAT(RoundPreservingSum(z, 3), ElementsAre(1, 1, 1));
}

TEST(SelectableFloor, LargestGivesTiesToTheHigherIndex) {
  int64_t u[] = {0, 5, 5};
  ApplySelectableFloor(u);
  EXPECT_THAT(u, ElementsAre(1, 5, 4));
  int64_t v[] = {-1, 6, 1};
  ApplySelectableFloor(v);
  EXPECT_THAT(v, ElementsAre(1, 4, 1));
}

TEST(Robustify, ExactWaterFill) {
  // demand [1, 4, 9, 16], p = 0.5: w ≈ [1, 2, 3, 4]. Total 20 in [2, 8]: λ = 2 gives [2, 4, 6, 8].
  const double d[] = {1, 4, 9, 16};
  auto a = Robustify(d, 20, 0.5, 2, 8);
  ASSERT_TRUE(a.ok());
  EXPECT_THAT(*a, ElementsAre(2, 4, 6, 8));
  // Total 24: the last unit clips at 8, the rest share 16 as λ·(1 + 2 + 3) = 16 -> λ = 8/3:
  // [2.67, 5.33, 8, 8] -> floors 2, 5, 8, 8 = 23, the extra token to the .67.
  auto b = Robustify(d, 24, 0.5, 2, 8);
  ASSERT_TRUE(b.ok());
  EXPECT_THAT(*b, ElementsAre(3, 5, 8, 8));
  // Floors bind at total 10: units 0 and 1 sit at lo = 2, the others solve 2 + 2 + λ(3 + 4) = 10,
  // so λ = 6/7: [2, 2, 2.57, 3.43] -> floors 2, 2, 2, 3 = 9, the extra token to the .57.
  auto c = Robustify(d, 10, 0.5, 2, 8);
  ASSERT_TRUE(c.ok());
  EXPECT_THAT(*c, ElementsAre(2, 2, 3, 3));
  EXPECT_EQ(Robustify(d, 40, 0.5, 2, 8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Robustify(d, 7, 0.5, 2, 8).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Robustify, SumAndBoundsOnRandomDemand) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(0, 100);
  for (int trial = 0; trial < 500; ++trial) {
    const int n = 1 + trial % 40;
    std::vector<double> d(static_cast<size_t>(n));
    for (double& x : d) x = trial % 7 == 0 ? 5.0 : u(rng);  // some all-equal demands
    const double lo = 1 + trial % 5, hi = lo * (1 + trial % 4) + 3;
    const int64_t total = static_cast<int64_t>(std::ceil(n * lo)) +
                          static_cast<int64_t>(u(rng) / 100 * (n * hi - std::ceil(n * lo)));
    auto r = Robustify(d, total, 0.5, lo, hi);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(std::accumulate(r->begin(), r->end(), int64_t{0}), total);
    for (int64_t v : *r) {
      EXPECT_GE(v, static_cast<int64_t>(std::floor(lo)));
      EXPECT_LE(v, static_cast<int64_t>(std::ceil(hi)));
    }
  }
}

TEST(CapAndRedistribute, HandsTheExcessOnByWeight) {
  // Unit 0 capped at 3 frees 3, shared 1 : 3 by units 1 and 2: 0.75 and 2.25 -> 1 and 2.
  int64_t u[] = {6, 2, 2};
  const int64_t caps[] = {3, 10, 10};
  const double w[] = {1, 1, 3};
  CapAndRedistribute(u, caps, w);
  EXPECT_THAT(u, ElementsAre(3, 3, 4));
  // Everyone saturated: the total shrinks.
  int64_t v[] = {5, 5};
  const int64_t small[] = {2, 3};
  CapAndRedistribute(v, small, w);
  EXPECT_THAT(v, ElementsAre(2, 3));
}

}  // namespace
}  // namespace reasonalloc
