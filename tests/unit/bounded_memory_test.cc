// Bounded memory per event: tiled scoring gives the scores of the whole-block path, an event's
// scratch is known from its shapes before anything is allocated, an exception in a pool thread
// reaches the caller, and the small numeric guards (normalised demand, robustify, compaction of
// nothing) hold on the inputs that once broke them.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <new>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/arena_layout.h"
#include "core/budget_math.h"
#include "core/engine.h"
#include "core/h2o.h"
#include "core/layer_profile.h"
#include "core/scorer.h"
#include "core/scratch.h"
#include "core/thread_pool.h"

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;

// Restores the default tile when a test ends, whatever it asserted.
struct TileBytes {
  explicit TileBytes(size_t bytes) { SetScoreTileBytesForTesting(bytes); }
  ~TileBytes() { SetScoreTileBytesForTesting(0); }
};

std::vector<float> Normal(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<float> ScoreWith(const ScorerConfig& config, const HeadInputs& in) {
  auto scorer = MakeScorer(config);
  EXPECT_TRUE(scorer.ok());
  std::vector<float> out(static_cast<size_t>(std::max(0, in.n - in.window)), -7.0f);
  EXPECT_TRUE((*scorer)->ScoreHead(in, out));
  return out;
}

void ExpectClose(const std::vector<float>& a, const std::vector<float>& b, float tol,
                 const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  float worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  EXPECT_LE(worst, tol) << what;
}

TEST(TiledScoring, SnapKvTilesGiveTheWholeBlockScores) {
  std::mt19937 rng(7);
  constexpr int kN = 300, kGroup = 3, kWindow = 8, kD = 16;
  const auto q = Normal(size_t{kGroup} * kWindow * kD, rng);
  const auto k = Normal(size_t{kN} * kD, rng);
  HeadInputs in{q.data(), k.data(), kN, kGroup, kWindow, kD, nullptr};
  for (GqaReduce gqa : {GqaReduce::kMax, GqaReduce::kMean, GqaReduce::kMeanScores}) {
    for (bool all_keys : {false, true}) {
      ScorerConfig c;
      c.kind = ScorerKind::kSnapKv;
      c.gqa_reduce = gqa;
      c.softmax_all_keys = all_keys;
      const auto whole = ScoreWith(c, in);
      std::vector<float> tiled;
      {
        TileBytes small(3 * kN * sizeof(float));  // one window row per GEMM (and fold)
        auto scorer = MakeScorer(c);
        // The plan really is tiled: the head needs less than the whole block would.
        EXPECT_LT((*scorer)->ScratchBytes(in),
                  int64_t{kGroup} * kWindow * kN * static_cast<int64_t>(sizeof(float)));
        tiled = ScoreWith(c, in);
      }
      ExpectClose(
          whole, tiled, 1e-6f,
          "gqa " + std::to_string(static_cast<int>(gqa)) + " all_keys " + std::to_string(all_keys));
    }
  }
}

TEST(TiledScoring, RkvRowTilesGiveTheWholeMatrixScores) {
  std::mt19937 rng(11);
  constexpr int kN = 257, kGroup = 2, kWindow = 4, kD = 8;
  const auto q = Normal(size_t{kGroup} * kWindow * kD, rng);
  auto k = Normal(size_t{kN} * kD, rng);
  // Near-duplicates, so that retain-last has rows to the left and to the right to find.
  for (int j = 0; j < kN; j += 5) {
    for (int i = 0; i < kD; ++i)
      k[static_cast<size_t>(j) * kD + i] = k[i] + 0.01f * static_cast<float>(j);
  }
  HeadInputs in{q.data(), k.data(), kN, kGroup, kWindow, kD, nullptr};
  for (double threshold : {0.5, 0.9, -0.2}) {
    ScorerConfig c;
    c.kind = ScorerKind::kRkv;
    c.threshold = threshold;
    const auto whole = ScoreWith(c, in);
    for (size_t tile_rows : {1, 7, 64}) {
      TileBytes small(tile_rows * kN * sizeof(float));
      ExpectClose(whole, ScoreWith(c, in), 1e-6f,
                  "threshold " + std::to_string(threshold) + ", " + std::to_string(tile_rows) +
                      " rows per tile");
    }
  }
}

TEST(TiledScoring, H2oWindowAttentionTilesAddTheSame) {
  std::mt19937 rng(3);
  constexpr int kN = 90, kGroup = 2, kWindow = 6, kD = 8;
  const auto q = Normal(size_t{kGroup} * kWindow * kD, rng);
  const auto k = Normal(size_t{kN} * kD, rng);
  std::vector<float> whole(kN, 0.0f), tiled(kN, 0.0f);
  ASSERT_TRUE(AddWindowAttention(q.data(), k.data(), kN, kGroup, kWindow, kD, 1, whole.data()));
  {
    TileBytes small(kN * sizeof(float));
    EXPECT_EQ(H2oChunkRows(kN, kWindow), 1);
    ASSERT_TRUE(AddWindowAttention(q.data(), k.data(), kN, kGroup, kWindow, kD, 1, tiled.data()));
  }
  ExpectClose(whole, tiled, 1e-6f, "h2o");
}

SessionConfig Config(int layers, int hq, int hkv, int d, int budget, int window,
                     const std::string& scorer) {
  SessionConfig c;
  c.model = {"m", layers, hq, hkv, d, DType::kFloat32, 1 << 20};
  c.budget.budget = budget;
  c.budget.window = window;
  c.scorer.kind = ParseScorer(scorer).value();
  return c;
}

// The shapes of the requests that killed the server: their scratch is now bounded by the tile,
// and computed without touching the (absent) tensors.
TEST(EventBytes, TheReproductionsAreBoundedByTheTile) {
  {
    // rkv, L 1, Hq 2, Hkv 2, d 1, N 260,000: an N × N matrix was 270 GB per head.
    auto engine = Engine::Create(Config(1, 2, 2, 1, 16, 8, "rkv"));
    ASSERT_TRUE(engine.ok()) << engine.status();
    const std::vector<int32_t> lengths = {260000, 260000};
    CompressInputs in{nullptr, nullptr, 260000, lengths, {}};
    const uint64_t bytes = (*engine)->EventBytes(in);
    EXPECT_LT(bytes, uint64_t{160} << 20) << bytes;
    in.max_event_bytes = uint64_t{8} << 20;
    const absl::Status refused = (*engine)->CheckInputs(in);
    EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
    EXPECT_THAT(std::string(refused.message()), HasSubstr("N = 260000"));
    EXPECT_THAT(std::string(refused.message()), HasSubstr("--max_event_bytes 8388608"));
  }
  {
    // snapkv, Hq 1024, Hkv 2, window 1024, N 32,768: the logits block was 68 GB per head.
    SessionConfig c = Config(1, 1024, 2, 1, 1100, 1024, "snapkv");
    auto engine = Engine::Create(c);
    ASSERT_TRUE(engine.ok()) << engine.status();
    const std::vector<int32_t> lengths = {32768, 32768};
    const CompressInputs in{nullptr, nullptr, 32768, lengths, {}};
    EXPECT_LT((*engine)->EventBytes(in), uint64_t{160} << 20);
  }
}

TEST(EventBytes, GrowsWithTheLongestHeadNotItsSquare) {
  auto engine = Engine::Create(Config(1, 1, 1, 8, 16, 4, "rkv"));
  ASSERT_TRUE(engine.ok());
  auto bytes_at = [&](int32_t n) {
    const std::vector<int32_t> lengths = {n};
    return (*engine)->EventBytes({nullptr, nullptr, n, lengths, {}});
  };
  // Past the point where n × n stops fitting the tile, doubling n at most doubles the scratch
  // (a fixed tile plus per-token vectors), where the square would quadruple it.
  const double ratio = static_cast<double>(bytes_at(64000)) / static_cast<double>(bytes_at(32000));
  EXPECT_LT(ratio, 2.5);
  EXPECT_GT(ratio, 1.0);
}

// One head is one unit of work between the engine's cancellation polls; a long one is polled
// between its tiles too, so a caller that went away (or a drain) stops it part-way.
TEST(Cancellation, ALongSingleHeadStopsBetweenItsTiles) {
  for (auto [scorer, group] :
       {std::pair{"rkv", 4}, std::pair{"snapkv", 4}, std::pair{"snapkv", 1}}) {
    SessionConfig c = Config(1, group, 1, 8, 16, 8, scorer);
    auto engine = Engine::Create(c);
    ASSERT_TRUE(engine.ok());
    std::mt19937 rng(5);
    constexpr int kN = 4000;
    const auto q = Normal(size_t{4} * 8 * 8, rng);
    const auto k = Normal(size_t{kN} * 8, rng);
    const std::vector<int32_t> lengths = {kN};
    TileBytes small(static_cast<size_t>(group) * kN * sizeof(float));  // a handful of rows per tile
    int polls = 0;
    CompressInputs in{q.data(), k.data(), kN, lengths, {}};
    in.cancel_poll_work = int64_t{1} << 40;  // never between heads: only the tiles poll
    in.cancelled = [&] { return ++polls >= 3; };
    auto d = (*engine)->Compress(in);
    EXPECT_EQ(d.status().code(), absl::StatusCode::kCancelled) << scorer;
    EXPECT_EQ(polls, 3) << scorer << ": it stopped at the third poll";
  }
}

TEST(ThreadPool, AnExceptionReachesTheCallerAndEveryIndexRuns) {
  ThreadPool pool(3);
  std::vector<int> ran(64, 0);
  EXPECT_THROW(pool.ParallelFor(64,
                                [&](int64_t i) {
                                  ran[static_cast<size_t>(i)] = 1;
                                  if (i % 9 == 4) throw std::bad_alloc();
                                }),
               std::bad_alloc);
  for (int r : ran) EXPECT_EQ(r, 1);
  // The pool still works afterwards.
  std::atomic<int> sum{0};
  pool.ParallelFor(10, [&](int64_t i) { sum += static_cast<int>(i); });
  EXPECT_EQ(sum.load(), 45);
}

TEST(NormaliseDemand, ExtremeFiniteInputsStayFinite) {
  for (double v : {5e-324, 1e-310, 1e308, 1.7e308}) {
    auto d = NormaliseDemand(std::vector<double>{v, v, v}, 3, "demand");
    ASSERT_TRUE(d.ok()) << v;
    for (double x : *d) EXPECT_EQ(x, 1.0) << v;
  }
  auto mixed = NormaliseDemand(std::vector<double>{1e308, 0.0}, 2, "demand");
  ASSERT_TRUE(mixed.ok());
  EXPECT_EQ((*mixed)[0], 2.0);
  EXPECT_EQ((*mixed)[1], 0.0);
}

TEST(Robustify, NonFiniteDemandIsAnErrorNotAnOverflow) {
  const std::vector<double> inf = {INFINITY, INFINITY};
  auto r = Robustify(inf, 64, 0.5, 8, 64);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("demand[0]"));
  // A finite demand whose power overflows a double still sums to the total.
  const std::vector<double> big = {1e300, 1.0};
  auto ok = Robustify(big, 64, 16.0, 8, 56);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)[0] + (*ok)[1], 64);
}

TEST(CompactInPlace, AnEventThatKeepsNothingMovesNothing) {
  Decision d;
  d.kept_lengths = {0, 0};
  d.head_offsets = {0, 0, 0};
  std::vector<int64_t> offsets = {0, 8};
  std::vector<unsigned char> k(64, 1), v(64, 2), scratch;
  CompactInPlace(d, offsets, offsets, 4, k.data(), v.data(), &scratch);
  EXPECT_EQ(k, std::vector<unsigned char>(64, 1));
  EXPECT_EQ(v, std::vector<unsigned char>(64, 2));
}

}  // namespace
}  // namespace reasonalloc
