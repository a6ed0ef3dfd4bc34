#include "core/layer_profile.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

namespace reasonalloc {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(KRho, SmallestPrefixOfTheSortedMassReachingRho) {
  const float a[] = {0.15f, 0.5f, 0.05f, 0.3f};
  EXPECT_EQ(KRho(a, 0.9), 3);  // .5 + .3 + .15 = .95
  EXPECT_EQ(KRho(a, 0.8), 2);  // .5 + .3 reaches .8 exactly
  EXPECT_EQ(KRho(a, 0.5), 1);
  EXPECT_EQ(KRho(a, 1.0), 4);
}

TEST(Calibration, MeasuresKRhoPerLayerAndNormalises) {
  // L = 2, one head, d = 1, window 1, 3 tokens; the newest query is 1.
  // Layer 0 keys 0, ln 3, ln 6: attention 1:3:6 / 10 -> ρ 0.85 needs 2 tokens (.6 + .3).
  // Layer 1 keys all 0: uniform thirds -> 3 tokens. Demand [2, 3] normalised to mean 1: [0.8, 1.2].
  ModelGeometry m{"m", 2, 1, 1, 1, DType::kFloat32, 64};
  CalibrationAccumulator acc(m, 1, 0.85);
  const float q[] = {1, 1};
  const float k[] = {0, std::log(3.0f), std::log(6.0f), 0, 0, 0};
  const int32_t lengths[] = {3, 3};
  acc.Observe({q, k, 3, lengths, {}});
  acc.Observe({q, k, 3, lengths, {}});
  EXPECT_THAT(acc.samples(), ElementsAre(2, 2));
  auto d = acc.Demand();
  ASSERT_TRUE(d.ok());
  EXPECT_NEAR((*d)[0], 0.8, 1e-9);
  EXPECT_NEAR((*d)[1], 1.2, 1e-9);
}

TEST(Calibration, NoSamplesIsAnError) {
  ModelGeometry m{"m", 2, 1, 1, 1, DType::kFloat32, 64};
  CalibrationAccumulator acc(m, 1, 0.9);
  EXPECT_EQ(acc.Demand().status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(NormaliseDemand, ChecksAndScales) {
  auto d = NormaliseDemand(std::vector<double>{1, 3}, 2, "demand");
  ASSERT_TRUE(d.ok());
  EXPECT_THAT(*d, ElementsAre(0.5, 1.5));
  EXPECT_THAT(
      std::string(NormaliseDemand(std::vector<double>{1}, 2, "p.demand").status().message()),
      HasSubstr("p.demand has 1 entries"));
  EXPECT_THAT(
      std::string(NormaliseDemand(std::vector<double>{1, NAN}, 2, "p.demand").status().message()),
      HasSubstr("p.demand[1]"));
  EXPECT_THAT(
      std::string(NormaliseDemand(std::vector<double>{0, 0}, 2, "p.demand").status().message()),
      HasSubstr("all zero"));
  EXPECT_FALSE(NormaliseDemand(std::vector<double>{-1, 2}, 2, "p.demand").ok());
}

}  // namespace
}  // namespace reasonalloc
