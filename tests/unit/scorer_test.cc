// Scorers against cases worked out by hand (the expected numbers come from the formulas of
// docs/algorithms.md §2, computed in the comments, not from running the implementation).
#include "core/scorer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace reasonalloc {
namespace {

std::vector<float> Score(const ScorerConfig& config, const std::vector<float>& queries,
                         const std::vector<float>& keys, int n, int group, int window, int d) {
  auto scorer = MakeScorer(config);
  EXPECT_TRUE(scorer.ok());
  HeadInputs in;
  in.queries = queries.data();
  in.keys = keys.data();
  in.n = n;
  in.group = group;
  in.window = window;
  in.head_dim = d;
  std::vector<float> out(static_cast<size_t>(std::max(0, n - window)), -1.0f);
  (*scorer)->ScoreHead(in, out);
  return out;
}

ScorerConfig SnapKv(int kernel, PoolKind pool = PoolKind::kMax, GqaReduce gqa = GqaReduce::kMax) {
  ScorerConfig c;
  c.kind = ScorerKind::kSnapKv;
  c.pool_kernel = kernel;
  c.pool_kind = pool;
  c.gqa_reduce = gqa;
  return c;
}

TEST(SnapKv, SoftmaxOverCandidatesOnly) {
  // d = 1, q = 1, keys 0, ln 2, ln 3 and a window token: logits 0, ln2, ln3 -> exp 1, 2, 3 -> /6.
  // The window token's logit (100) must not enter the softmax.
  const std::vector<float> q = {1.0f};
  const std::vector<float> k = {0.0f, std::log(2.0f), std::log(3.0f), 100.0f};
  const auto s = Score(SnapKv(1), q, k, 4, 1, 1, 1);
  ASSERT_EQ(s.size(), 3u);
  EXPECT_NEAR(s[0], 1.0 / 6, 1e-6);
  EXPECT_NEAR(s[1], 2.0 / 6, 1e-6);
  EXPECT_NEAR(s[2], 3.0 / 6, 1e-6);
}

TEST(SnapKv, MaxPoolIgnoresPadding) {
  // Same softmax [1/6, 1/3, 1/2], max over a window of 3: [max(1/6,1/3), max(all), max(1/3,1/2)].
  const std::vector<float> q = {1.0f};
  const std::vector<float> k = {0.0f, std::log(2.0f), std::log(3.0f), 0.0f};
  const auto s = Score(SnapKv(3), q, k, 4, 1, 1, 1);
  EXPECT_NEAR(s[0], 1.0 / 3, 1e-6);
  EXPECT_NEAR(s[1], 1.0 / 2, 1e-6);
  EXPECT_NEAR(s[2], 1.0 / 2, 1e-6);
}

TEST(SnapKv, AvgPoolCountsPaddingAsZero) {
  // [1/6, 1/3, 1/2] averaged over 3 with zero padding: [(0+1/6+1/3)/3, (1/6+1/3+1/2)/3,
  // (1/3+1/2+0)/3].
  const std::vector<float> q = {1.0f};
  const std::vector<float> k = {0.0f, std::log(2.0f), std::log(3.0f), 0.0f};
  const auto s = Score(SnapKv(3, PoolKind::kAvg), q, k, 4, 1, 1, 1);
  EXPECT_NEAR(s[0], 1.0 / 6, 1e-6);
  EXPECT_NEAR(s[1], 1.0 / 3, 1e-6);
  EXPECT_NEAR(s[2], 5.0 / 18, 1e-6);
}

TEST(SnapKv, GqaReductionActsOnLogitsBeforeSoftmax) {
  // Group of 2 query heads q0 = 1, q1 = -1; keys 1, -2 (+ window). Logits: g0 [1, -2], g1 [-1, 2].
  // max -> [1, 2] -> softmax [1/(1+e), e/(1+e)];  mean -> [0, 0] -> [1/2, 1/2].
  const std::vector<float> q = {1.0f, -1.0f};
  const std::vector<float> k = {1.0f, -2.0f, 0.0f};
  const double e = std::exp(1.0);
  const auto mx = Score(SnapKv(1), q, k, 3, 2, 1, 1);
  EXPECT_NEAR(mx[0], 1 / (1 + e), 1e-6);
  EXPECT_NEAR(mx[1], e / (1 + e), 1e-6);
  const auto mean = Score(SnapKv(1, PoolKind::kMax, GqaReduce::kMean), q, k, 3, 2, 1, 1);
  EXPECT_NEAR(mean[0], 0.5, 1e-6);
  EXPECT_NEAR(mean[1], 0.5, 1e-6);
}

TEST(SnapKv, MeanOverTheWindowAndScaleBySqrtD) {
  // d = 4 so logits are q·k / 2. Window of 2 queries: q_a0 = (2,0,0,0), q_a1 = 0.
  // Keys (x,0,0,0) with x = 0 and ln 3: a0 logits [0, ln3] -> [1/4, 3/4]; a1 uniform [1/2, 1/2].
  // Mean: [3/8, 5/8].
  const std::vector<float> q = {2, 0, 0, 0, 0, 0, 0, 0};
  const std::vector<float> k = {0, 0, 0, 0, std::log(3.0f), 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9};
  const auto s = Score(SnapKv(1), q, k, 4, 1, 2, 4);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_NEAR(s[0], 3.0 / 8, 1e-6);
  EXPECT_NEAR(s[1], 5.0 / 8, 1e-6);
}

TEST(SnapKv, NothingToScoreWhenAllTokensAreInTheWindow) {
  const std::vector<float> q = {1.0f};
  const std::vector<float> k = {1.0f, 2.0f};
  EXPECT_TRUE(Score(SnapKv(7), q, k, 2, 1, 2, 1).empty());
}

TEST(Streaming, NewestFirstByAgeFromTheEnd) {
  ScorerConfig c;
  c.kind = ScorerKind::kStreaming;
  const auto s = Score(c, {}, std::vector<float>(10, 0.0f), 10, 1, 2, 1);
  ASSERT_EQ(s.size(), 8u);
  for (int j = 0; j < 7; ++j) EXPECT_LT(s[j], s[j + 1]);  // newer beats older
  // The score is minus the age from the head's end: row 7 of 10 rows is 2 steps old.
  EXPECT_EQ(s[7], -2.0f);
  EXPECT_EQ(s[2], -7.0f);
}

TEST(ProtectScores, SinksThenNewestAboveEveryScore) {
  // 12 rows, window 2: candidates 0..9. Sinks 2, recent 5: rows 0-1 and 7-9 (ages 4..2) protected.
  std::vector<float> s(10, 1e6f);
  ProtectScores(12, 2, 2, 5, s);
  EXPECT_EQ(s[0], kSinkScore);
  EXPECT_EQ(s[1], kSinkScore);
  for (int j = 2; j < 7; ++j) EXPECT_EQ(s[static_cast<size_t>(j)], 1e6f) << j;
  EXPECT_EQ(s[7], kRecentScore - 4);
  EXPECT_EQ(s[9], kRecentScore - 2);
  EXPECT_GT(s[1], s[9]);  // sinks outrank the recent rows
  EXPECT_GT(s[9], s[8]);  // newer recent rows outrank older ones
  EXPECT_GT(s[7], 1e6f);  // every protected row outranks every scored one
  // Nothing to protect: recent up to the window, no sinks.
  std::vector<float> t(10, 0.5f);
  ProtectScores(12, 2, 0, 2, t);
  EXPECT_EQ(t, std::vector<float>(10, 0.5f));
  // More sinks than candidates stay inside the candidates.
  std::vector<float> u(3, 0.0f);
  ProtectScores(5, 2, 8, 0, u);
  EXPECT_EQ(u, std::vector<float>(3, kSinkScore));
}

TEST(Rkv, ImportanceMinusRedundancyWithRetainLast) {
  // d = 2, window 1, zero queries (so I is uniform: 1/3 over the 3 candidates), λ = 0.1, T = 0.5.
  // Keys: k0 = k1 = k2 = (1, 0), k3 = (0, 1). Cosine S (diag 0) is 1 among {0, 1, 2}, else 0.
  // Retain last zeroes, per row, the largest j with S > T: S[0,2], S[1,2], S[2,1]. Left: S[0,1],
  // S[1,0], S[2,0] = 1. Column means over the 4 rows: [2/4, 1/4, 0, 0]. R = softmax of those.
  ScorerConfig c;
  c.kind = ScorerKind::kRkv;
  c.pool_kernel = 1;
  const std::vector<float> q = {0, 0};
  const std::vector<float> k = {1, 0, 1, 0, 1, 0, 0, 1};
  const auto s = Score(c, q, k, 4, 1, 1, 2);
  const double z = std::exp(0.5) + std::exp(0.25) + 1 + 1;
  const double r[] = {std::exp(0.5) / z, std::exp(0.25) / z, 1 / z};
  ASSERT_EQ(s.size(), 3u);
  for (int j = 0; j < 3; ++j) EXPECT_NEAR(s[j], 0.1 / 3 - 0.9 * r[j], 1e-6) << j;
  // The newest of the duplicates ranks highest: older duplicates look more redundant.
  EXPECT_GT(s[2], s[1]);
  EXPECT_GT(s[1], s[0]);
}

TEST(Rkv, ZeroNormKeysScoreFinite) {
  ScorerConfig c;
  c.kind = ScorerKind::kRkv;
  const std::vector<float> q = {1, 1};
  const std::vector<float> k(2 * 6, 0.0f);
  for (float v : Score(c, q, k, 6, 1, 1, 2)) EXPECT_TRUE(std::isfinite(v));
}

TEST(Scorer, UnknownNamesAreRefused) {
  // Names become kinds where they enter the process; an unknown one never reaches MakeScorer.
  EXPECT_FALSE(ParseScorer("oracle").ok());
}

TEST(SnapKv, SoftmaxOverAllKeysIsCausalInTheWindow) {
  // kvpress form: the window query (position 3) sees keys 0, ln2, ln3, ln4 -> exp 1..4 over 10;
  // the candidates keep their share of the full softmax: 0.1, 0.2, 0.3.
  ScorerConfig c = SnapKv(1);
  c.softmax_all_keys = true;
  const std::vector<float> q = {1.0f};
  const std::vector<float> k = {0.0f, std::log(2.0f), std::log(3.0f), std::log(4.0f)};
  const auto s = Score(c, q, k, 4, 1, 1, 1);
  EXPECT_NEAR(s[0], 0.1, 1e-6);
  EXPECT_NEAR(s[1], 0.2, 1e-6);
  EXPECT_NEAR(s[2], 0.3, 1e-6);
}

TEST(SnapKv, SoftmaxOverAllKeysMasksLaterWindowTokens) {
  // Window 2: row 0 (position 2) sees keys 0..2, row 1 (position 3) sees 0..3. Keys 0, ln2, ln3,
  // ln4 with q = 1: row 0 -> [1, 2, 3] / 6, row 1 -> [1, 2, 3, 4] / 10. Candidates 0 and 1,
  // mean over the window: [(1/6 + 1/10) / 2, (2/6 + 2/10) / 2].
  ScorerConfig c = SnapKv(1);
  c.softmax_all_keys = true;
  const std::vector<float> q = {1.0f, 1.0f};
  const std::vector<float> k = {0.0f, std::log(2.0f), std::log(3.0f), std::log(4.0f)};
  const auto s = Score(c, q, k, 4, 1, 2, 1);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_NEAR(s[0], (1.0 / 6 + 0.1) / 2, 1e-6);
  EXPECT_NEAR(s[1], (2.0 / 6 + 0.2) / 2, 1e-6);
}

TEST(SnapKv, MeanScoresPoolsEachQueryHeadBeforeTheGroupMean) {
  // Group 2, q = +1 and -1, keys 0, ln2, ln3 (+ a window token). Head 0: [1, 2, 3] / 6; head 1:
  // [1, 1/2, 1/3] / (11/6) = [6, 3, 2] / 11. Max pool 3 per head: [1/3, 1/2, 1/2] and
  // [6/11, 6/11, 3/11]; then the mean over the group. (Averaging first and pooling after would
  // give [.356, .356, .341] instead.)
  const std::vector<float> q = {1.0f, -1.0f};
  const std::vector<float> k = {0.0f, std::log(2.0f), std::log(3.0f), 0.0f};
  const auto s = Score(SnapKv(3, PoolKind::kMax, GqaReduce::kMeanScores), q, k, 4, 2, 1, 1);
  EXPECT_NEAR(s[0], (1.0 / 3 + 6.0 / 11) / 2, 1e-6);
  EXPECT_NEAR(s[1], (1.0 / 2 + 6.0 / 11) / 2, 1e-6);
  EXPECT_NEAR(s[2], (1.0 / 2 + 3.0 / 11) / 2, 1e-6);
}

TEST(H2o, ScoreIsTheAccumulator) {
  ScorerConfig c;
  c.kind = ScorerKind::kH2o;
  auto scorer = MakeScorer(c);
  ASSERT_TRUE(scorer.ok());
  const std::vector<float> acc = {0.5f, 0.25f, 2.0f, 9.0f};
  HeadInputs in;
  in.n = 4;
  in.window = 1;
  in.head_dim = 1;
  in.accumulated = acc.data();
  std::vector<float> out(3);
  ASSERT_TRUE((*scorer)->ScoreHead(in, out));
  EXPECT_EQ(out, (std::vector<float>{0.5f, 0.25f, 2.0f}));  // the window token is not scored
}

}  // namespace
}  // namespace reasonalloc
