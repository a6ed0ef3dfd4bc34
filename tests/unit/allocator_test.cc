// Allocators against hand-worked cases (docs/algorithms.md §3) and their invariants on random
// inputs.
#include "core/allocator.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <numeric>
#include <random>

#include "core/engine.h"

namespace reasonalloc {
namespace {

using ::testing::ElementsAre;

SessionConfig Config(int L, int hkv, int budget, int window, const std::string& allocator) {
  SessionConfig c;
  c.model = {"m", L, hkv, hkv, 4, DType::kFloat32, 1 << 16};
  c.budget.budget = budget;
  c.budget.window = window;
  c.allocator.kind = ParseAllocator(allocator).value();
  return c;
}

std::vector<int32_t> Allocate(const SessionConfig& c, const std::vector<std::vector<float>>& scores,
                              const std::vector<double>& demand = {}) {
  std::vector<int32_t> lengths;
  for (const auto& s : scores) lengths.push_back(static_cast<int32_t>(s.size()) + c.budget.window);
  auto allocator = MakeAllocator(c.allocator);
  EXPECT_TRUE(allocator.ok());
  std::vector<int32_t> budgets(scores.size());
  const absl::Status s = (*allocator)->Allocate({&c, lengths, scores, demand, {}}, budgets);
  EXPECT_TRUE(s.ok()) << s;
  return budgets;
}

TEST(Pyramid, ClosedForm) {
  // L = 4, B = 28, window 8: base 20, β 20 -> min 1, max 39; x = 39, 26.33, 13.67, 1 (Σ 80).
  // Floors 39, 26, 13, 1 = 79; the extra token goes to the largest fraction (.67, layer 2).
  auto layers = LayerBudgets(Config(4, 2, 28, 8, "pyramid"), {});
  ASSERT_TRUE(layers.ok());
  EXPECT_THAT(*layers, ElementsAre(47, 34, 22, 9));
  const std::vector<std::vector<float>> scores(8, std::vector<float>(3, 0.0f));
  EXPECT_THAT(Allocate(Config(4, 2, 28, 8, "pyramid"), scores),
              ElementsAre(47, 47, 34, 34, 22, 22, 9, 9));
}

TEST(Pyramid, SmallBudgetsKeepOneSelectableTokenPerLayer) {
  // base 4 over 8 layers: min 0.2 -> the deepest layers would round to 0 selectable tokens.
  auto layers = LayerBudgets(Config(8, 1, 12, 8, "pyramid"), {});
  ASSERT_TRUE(layers.ok());
  int64_t sum = 0;
  for (int32_t b : *layers) {
    EXPECT_GE(b, 9);
    sum += b - 8;
  }
  EXPECT_EQ(sum, 8 * 4);
}

TEST(AdaKv, HeadsShareThePoolWithAFloor) {
  // One layer, 2 heads, window 1, B 3: 2 selectable per head, pool total 4, a = 0.2.
  // Top 4 of the pool: 0.9, 0.8, 0.7 (head 0) and 0.2 (head 1): counts 3, 1.
  // x = 3·0.8 + 0.2·2 = 2.8 and 1·0.8 + 0.4 = 1.2 -> floors 2, 1; the extra to .8 -> 3, 1.
  const auto b =
      Allocate(Config(1, 2, 3, 1, "adakv"), {{0.9f, 0.8f, 0.7f, 0.1f}, {0.2f, 0.05f, 0.01f, 0.0f}});
  EXPECT_THAT(b, ElementsAre(4, 2));
}

TEST(AdaKv, AHeadNeverKeepsMoreThanItHas) {
  // Head 0 has a single candidate; its share (x = 0.8·1 + 0.2·4 = 1.6 -> 2) is capped at 1 and the
  // freed token goes to head 1: 1 + 7 = 8 = 2 · 4.
  const auto b = Allocate(Config(1, 2, 5, 1, "adakv"), {{5.0f}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1}});
  EXPECT_THAT(b, ElementsAre(2, 8));
}

TEST(ReasonAlloc, HeadRoutingFollowsHighUtilityCounts) {
  // One layer, 2 heads, window 1, B 5: 4 selectable each, layer total 8. Head 0 scores 10..1, head
  // 1 all 0: the 8th largest is 3, so r = [8, 0]. robustify(r, 8, p 0.5, lo = 0.25·4 = 1, hi = 8):
  // w = [√8, 0.001]; head 1 sits at lo = 1 and head 0 takes 7. Budgets: 8 and 2.
  auto c = Config(1, 2, 5, 1, "reasonalloc");
  c.allocator.reasonalloc_mode = ReasonAllocMode::kHead;
  const auto b = Allocate(c, {{10, 9, 8, 7, 6, 5, 4, 3, 2, 1}, std::vector<float>(10, 0.0f)});
  EXPECT_THAT(b, ElementsAre(8, 2));
}

TEST(ReasonAlloc, LayerWaveFollowsTheProfile) {
  // L 4, B 18, window 8: base 10, total 40, clip [2.5, 20], γ 0.5. Demand [1, 4, 9, 16] -> w
  // ≈ 1..4, λ = 4: [4, 8, 12, 16]. Budgets 12, 16, 20, 24.
  auto c = Config(4, 1, 18, 8, "reasonalloc");
  c.allocator.reasonalloc_mode = ReasonAllocMode::kLayer;
  const std::vector<double> demand = {1, 4, 9, 16};
  auto layers = LayerBudgets(c, demand);
  ASSERT_TRUE(layers.ok());
  EXPECT_THAT(*layers, ElementsAre(12, 16, 20, 24));
  // A profile of the wrong depth is refused.
  EXPECT_EQ(LayerBudgets(c, std::vector<double>{1, 2}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // Head mode ignores the wave.
  c.allocator.reasonalloc_mode = ReasonAllocMode::kHead;
  EXPECT_THAT(*LayerBudgets(c, demand), ElementsAre(18, 18, 18, 18));
}

TEST(ReasonAlloc, StaticModeSplitsEachLayerByTheProfilesHeadDemand) {
  // One layer, 3 heads, window 2, B 18: 16 selectable each, layer total 48. Head demand [4, 1, 1]
  // with β 1 and no floor: shares 32, 8, 8, budgets 34, 10, 10, whatever the scores.
  auto c = Config(1, 3, 18, 2, "reasonalloc");
  c.allocator.reasonalloc_mode = ReasonAllocMode::kStatic;
  c.allocator.head_exponent = 1.0;
  c.allocator.head_floor = 0.0;
  const ProfileDemand demand({}, {4, 1, 1});
  const std::vector<int32_t> long_heads = {60, 60, 60};
  std::vector<int32_t> budgets(3);
  ASSERT_TRUE(HeadBudgetsFromProfile(c, long_heads, demand.layers, demand.heads, budgets).ok());
  EXPECT_THAT(budgets, ElementsAre(34, 10, 10));
  // The allocator gives the same through Allocate, with scores that would route otherwise.
  const std::vector<std::vector<float>> scores = {
      std::vector<float>(58, 0.0f), std::vector<float>(58, 1.0f), std::vector<float>(58, 2.0f)};
  std::vector<int32_t> allocated(3);
  ASSERT_TRUE(AllocatorOf(c.allocator.kind)
                  .Allocate({&c, long_heads, scores, demand.layers, demand.heads}, allocated)
                  .ok());
  EXPECT_EQ(allocated, budgets);
  // Head 0 holds only 10 candidates: it keeps them and heads 1 and 2 share the other 22.
  ASSERT_TRUE(HeadBudgetsFromProfile(c, std::vector<int32_t>{12, 60, 60}, demand.layers,
                                     demand.heads, budgets)
                  .ok());
  EXPECT_THAT(budgets, ElementsAre(12, 21, 21));
  // The floor: head_floor 0.25 of the equal share (16) is 4 for a head that demands nothing.
  c.allocator.head_floor = 0.25;
  ASSERT_TRUE(
      HeadBudgetsFromProfile(c, long_heads, demand.layers, std::vector<double>{1, 0, 1}, budgets)
          .ok());
  EXPECT_THAT(budgets, ElementsAre(24, 6, 24));
}

TEST(ReasonAlloc, StaticModeRefusesAProfileWithoutItsHeadDemand) {
  auto c = Config(2, 3, 18, 2, "reasonalloc");
  c.allocator.reasonalloc_mode = ReasonAllocMode::kStatic;
  c.allocator.profile = "wave";
  auto none = Engine::Create(c, ProfileDemand({1, 1}, {}));
  ASSERT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(none.status().message(), ::testing::HasSubstr("head_demand"));
  EXPECT_THAT(none.status().message(), ::testing::HasSubstr("\"wave\" has 0"));
  auto short_profile = Engine::Create(c, ProfileDemand({1, 1}, {1, 1, 1}));
  ASSERT_EQ(short_profile.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(short_profile.status().message(), ::testing::HasSubstr("= 6 entries"));
  auto negative = Engine::Create(c, ProfileDemand({1, 1}, {1, 1, 1, 1, -1, 1}));
  ASSERT_EQ(negative.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(negative.status().message(), ::testing::HasSubstr("head_demand[4]"));
  EXPECT_TRUE(Engine::Create(c, ProfileDemand({1, 1}, {1, 1, 1, 2, 0, 1})).ok());
  // Other modes ignore a head demand.
  c.allocator.reasonalloc_mode = ReasonAllocMode::kFull;
  EXPECT_TRUE(Engine::Create(c, ProfileDemand({1, 1}, {})).ok());
}

// Random sessions through the whole engine: budget sums, floors, saturation, window and exact
// counts.
TEST(Allocators, InvariantsOnRandomInputs) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  const char* allocators[] = {"uniform", "pyramid", "adakv", "reasonalloc"};
  const ReasonAllocMode modes[] = {ReasonAllocMode::kFull, ReasonAllocMode::kHead,
                                   ReasonAllocMode::kLayer, ReasonAllocMode::kOff,
                                   ReasonAllocMode::kStatic};
  for (int trial = 0; trial < 240; ++trial) {
    const int L = 1 + trial % 4, hkv = 1 + trial % 3, group = 1 + (trial / 3) % 3,
              d = 4 + trial % 5;
    SessionConfig c;
    c.model = {"m", L, hkv * group, hkv, d, DType::kFloat32, 1 << 16};
    c.budget.window = 1 + trial % 6;
    c.budget.budget = c.budget.window + 1 + trial % 17;
    c.scorer.kind = trial % 2 ? ScorerKind::kRkv : ScorerKind::kSnapKv;
    c.allocator.kind = ParseAllocator(allocators[trial % 4]).value();
    c.allocator.reasonalloc_mode = modes[(trial / 4) % 5];
    ProfileDemand demand;
    if (trial % 8 == 3) {
      for (int l = 0; l < L; ++l) demand.layers.push_back(1 + 10 * std::abs(normal(rng)));
    }
    if (c.allocator.reasonalloc_mode == ReasonAllocMode::kStatic) {
      for (int h = 0; h < L * hkv; ++h) {
        demand.heads.push_back(trial % 7 == 0 ? 0.0 : std::abs(normal(rng)));
      }
    }
    auto engine = Engine::Create(c, demand);
    ASSERT_TRUE(engine.ok()) << engine.status();
    const int64_t heads = int64_t{L} * hkv;
    const int64_t n_max = 1 + trial % 50;
    std::vector<float> q(static_cast<size_t>(L * hkv * group * c.budget.window * d));
    std::vector<float> k(static_cast<size_t>(heads * n_max * d));
    for (float& x : q) x = normal(rng);
    for (float& x : k) x = trial % 5 == 0 ? 1.0f : normal(rng);  // some all-equal keys
    std::vector<int32_t> lengths;
    std::uniform_int_distribution<int32_t> len(0, static_cast<int32_t>(n_max));
    for (int64_t h = 0; h < heads; ++h)
      lengths.push_back(trial % 3 ? static_cast<int32_t>(n_max) : len(rng));
    auto dec = (*engine)->Compress({q.data(), k.data(), n_max, lengths, {}});
    ASSERT_TRUE(dec.ok()) << dec.status();
    const int window = c.budget.window;
    const bool head_wise = c.allocator.kind == AllocatorKind::kAdaKv ||
                           (c.allocator.kind == AllocatorKind::kReasonAlloc &&
                            (c.allocator.reasonalloc_mode == ReasonAllocMode::kHead ||
                             c.allocator.reasonalloc_mode == ReasonAllocMode::kFull ||
                             c.allocator.reasonalloc_mode == ReasonAllocMode::kStatic));
    int64_t sum = 0;
    bool saturated = false;
    for (int64_t h = 0; h < heads; ++h) {
      const int32_t b = dec->budgets[static_cast<size_t>(h)];
      const int32_t n = lengths[static_cast<size_t>(h)];
      const int64_t cand = std::max(0, n - window);
      sum += b;
      if (head_wise) {
        ASSERT_LE(b - window, cand) << "head " << h << " trial " << trial;
        if (b - window == cand) saturated = true;
      } else {
        ASSERT_GE(b, window + 1);
      }
      // Each head keeps exactly its budget or everything.
      ASSERT_EQ(dec->kept_lengths[static_cast<size_t>(h)], std::min(n, b));
    }
    if (saturated) {
      EXPECT_LE(sum, heads * c.budget.budget) << "trial " << trial;
    } else {
      EXPECT_EQ(sum, heads * c.budget.budget) << "trial " << trial;
    }
  }
}

TEST(ReasonAlloc, BothLevelsOffSelectsExactlyWhatUniformRkvSelects) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (int trial = 0; trial < 40; ++trial) {
    SessionConfig c;
    c.model = {"m", 3, 8, 2, 16, DType::kFloat32, 1 << 16};
    c.budget.budget = 12 + trial;
    c.scorer.kind = ScorerKind::kRkv;
    SessionConfig off = c;
    off.allocator.kind = AllocatorKind::kReasonAlloc;
    off.allocator.reasonalloc_mode = ReasonAllocMode::kOff;
    auto uniform = Engine::Create(c);
    auto reasonalloc = Engine::Create(off, std::vector<double>{1, 2, 3});
    ASSERT_TRUE(uniform.ok() && reasonalloc.ok());
    const int64_t n = 40 + trial * 3;
    std::vector<float> q(3 * 8 * 8 * 16), k(static_cast<size_t>(3 * 2 * n * 16));
    for (float& x : q) x = normal(rng);
    for (float& x : k) x = normal(rng);
    std::vector<int32_t> lengths(6, static_cast<int32_t>(n));
    auto a = (*uniform)->Compress({q.data(), k.data(), n, lengths, {}});
    auto b = (*reasonalloc)->Compress({q.data(), k.data(), n, lengths, {}});
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->budgets, b->budgets);
    EXPECT_EQ(a->kept_indices, b->kept_indices);
  }
}

}  // namespace
}  // namespace reasonalloc
