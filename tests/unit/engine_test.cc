#include "core/engine.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <set>

#include "core/compute_backend.h"
#include "core/selector.h"

namespace reasonalloc {
namespace {

using ::testing::ElementsAre;

SessionConfig Config(int L, int hq, int hkv, int d, int budget, const std::string& scorer) {
  SessionConfig c;
  c.model = {"m", L, hq, hkv, d, DType::kFloat32, 1 << 16};
  c.budget.budget = budget;
  c.scorer.kind = ParseScorer(scorer).value();
  return c;
}

struct RandomInputs {
  std::vector<float> q, k;
  std::vector<int32_t> lengths;
  int64_t n_max;
  CompressInputs view() const { return {q.data(), k.data(), n_max, lengths, {}}; }
};

RandomInputs MakeInputs(const SessionConfig& c, int64_t n_max, std::mt19937& rng) {
  RandomInputs r;
  r.n_max = n_max;
  const auto& m = c.model;
  std::normal_distribution<float> normal;
  r.q.resize(static_cast<size_t>(m.num_layers * m.num_q_heads * c.budget.window * m.head_dim));
  for (float& x : r.q) x = normal(rng);
  r.k.resize(static_cast<size_t>(m.num_heads_total() * n_max * m.head_dim));
  for (float& x : r.k) x = normal(rng);
  std::uniform_int_distribution<int32_t> len(0, static_cast<int32_t>(n_max));
  for (int64_t h = 0; h < m.num_heads_total(); ++h) r.lengths.push_back(len(rng));
  return r;
}

TEST(Engine, InvariantsOnRandomInputs) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 60; ++trial) {
    const int hkv = 1 + trial % 4;
    const int group = 1 + trial % 3;
    const std::string scorer = trial % 2 == 0 ? "snapkv" : "streaming";
    SessionConfig c =
        Config(1 + trial % 3, hkv * group, hkv, 4 + trial % 5, 9 + trial % 30, scorer);
    c.budget.window = 1 + trial % 8;
    c.budget.budget = std::max(c.budget.budget, c.budget.window + 1);
    auto engine = Engine::Create(c);
    ASSERT_TRUE(engine.ok()) << engine.status();
    const RandomInputs in = MakeInputs(c, 1 + trial * 3, rng);
    auto d = (*engine)->Compress(in.view());
    ASSERT_TRUE(d.ok()) << d.status();
    const int64_t heads = c.model.num_heads_total();
    // Σ budgets is exactly L·Hkv·B under the uniform allocator.
    EXPECT_EQ(std::accumulate(d->budgets.begin(), d->budgets.end(), int64_t{0}),
              heads * c.budget.budget);
    int64_t evicted = 0;
    const std::vector<uint64_t> mask = BuildKeepMask(*d, in.n_max);
    const int words = WordsPerHead(in.n_max);
    for (int64_t h = 0; h < heads; ++h) {
      const int n = in.lengths[static_cast<size_t>(h)];
      const auto kept = d->Kept(h);
      // Each head keeps exactly its budget or everything.
      ASSERT_EQ(static_cast<int>(kept.size()), std::min(n, c.budget.budget));
      ASSERT_TRUE(std::is_sorted(kept.begin(), kept.end()));
      ASSERT_EQ(std::set<int32_t>(kept.begin(), kept.end()).size(), kept.size());
      // The window is always kept.
      for (int j = std::max(0, n - c.budget.window); j < n; ++j) {
        ASSERT_TRUE(std::binary_search(kept.begin(), kept.end(), j)) << "window token " << j;
      }
      // Streaming keeps the sinks whenever the budget leaves room for them.
      if (scorer == "streaming" && n > c.budget.budget) {
        const int sinks = std::min(EffectiveSinks(c), c.budget.budget - c.budget.window);
        for (int j = 0; j < sinks; ++j) ASSERT_EQ(kept[static_cast<size_t>(j)], j);
      }
      // The mask says the same as the indices.
      int bits = 0;
      for (int w = 0; w < words; ++w)
        bits += __builtin_popcountll(mask[static_cast<size_t>(h * words + w)]);
      ASSERT_EQ(bits, static_cast<int>(kept.size()));
      for (int32_t j : kept)
        ASSERT_TRUE(mask[static_cast<size_t>(h * words + j / 64)] >> (j % 64) & 1);
      evicted += n - static_cast<int64_t>(kept.size());
    }
    EXPECT_EQ(d->evicted_tokens, evicted);
  }
}

TEST(Engine, SnapKvKeepsTheKeysTheWindowAttendsTo) {
  // One head, d = 2, window 2. The window queries point along +x; candidate keys along +x get large
  // logits, the rest point along +y. Budget 4 keeps the two +x keys (indices 3 and 7) and the
  // window.
  SessionConfig c = Config(1, 1, 1, 2, 4, "snapkv");
  c.budget.window = 2;
  c.scorer.pool_kernel = 1;
  auto engine = Engine::Create(c);
  ASSERT_TRUE(engine.ok());
  std::vector<float> q = {5, 0, 5, 0};
  std::vector<float> k;
  for (int j = 0; j < 12; ++j) {
    const bool hot = j == 3 || j == 7;
    k.push_back(hot ? 3.0f : 0.0f);
    k.push_back(hot ? 0.0f : 1.0f);
  }
  std::vector<int32_t> lengths = {12};
  auto d = (*engine)->Compress({q.data(), k.data(), 12, lengths, {}});
  ASSERT_TRUE(d.ok());
  EXPECT_THAT(d->Kept(0), ElementsAre(3, 7, 10, 11));
  EXPECT_EQ(d->evicted_tokens, 8);
}

TEST(Engine, StreamingRanksRaggedHeadsByAgeFromTheirEnds) {
  // One layer, 2 KV heads of 30 and 14 rows, window 2, budget 8, sinks 4, adakv: both heads'
  // candidates compete in one pool. Equal age ranks equal, so each head keeps its 4 sinks and its
  // 2 newest candidates besides the window, budgets [8, 8]; ranking by row index would give the
  // long head [10, 6] and keep its rows 24-25 (5 and 4 steps old) over the short head's rows
  // 10-11 (3 and 2 steps old).
  for (const std::string allocator : {"adakv", "reasonalloc"}) {
    SessionConfig c = Config(1, 2, 2, 4, 8, "streaming");
    c.budget.window = 2;
    c.budget.sinks = 4;
    c.allocator.kind = ParseAllocator(allocator).value();
    c.allocator.reasonalloc_mode = ReasonAllocMode::kHead;
    auto engine = Engine::Create(c);
    ASSERT_TRUE(engine.ok()) << engine.status();
    std::vector<float> q(2 * 2 * 4, 1.0f), k(2 * 30 * 4, 1.0f);
    std::vector<int32_t> lengths = {30, 14};
    auto d = (*engine)->Compress({q.data(), k.data(), 30, lengths, {}});
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_THAT(d->budgets, ElementsAre(8, 8)) << allocator;
    EXPECT_THAT(d->Kept(0), ElementsAre(0, 1, 2, 3, 26, 27, 28, 29)) << allocator;
    EXPECT_THAT(d->Kept(1), ElementsAre(0, 1, 2, 3, 10, 11, 12, 13)) << allocator;
  }
}

TEST(Engine, SinksAndRecentAreKeptByEveryScorer) {
  // 2 layers × 2 KV heads, G 2, d 8, window 4, budget 24, sinks 3, recent 12, heads of 60 rows:
  // whatever the scorer and allocator, a head given room for them keeps rows 0-2 and 48-59, and
  // its other rows are the scorer's choice (the counts stay the budgets).
  std::mt19937 rng(11);
  for (const std::string scorer : {"snapkv", "h2o", "rkv", "streaming"}) {
    for (const std::string allocator : {"uniform", "adakv", "reasonalloc"}) {
      SessionConfig c = Config(2, 4, 2, 8, 24, scorer);
      c.budget.window = 4;
      c.budget.sinks = 3;
      c.budget.recent = 12;
      c.allocator.kind = ParseAllocator(allocator).value();
      c.allocator.reasonalloc_mode = ReasonAllocMode::kHead;
      auto engine = Engine::Create(c);
      ASSERT_TRUE(engine.ok()) << engine.status();
      RandomInputs in = MakeInputs(c, 60, rng);
      in.lengths.assign(4, 60);
      auto d = (*engine)->Compress(in.view());
      ASSERT_TRUE(d.ok()) << d.status();
      for (int64_t h = 0; h < 4; ++h) {
        const auto kept = d->Kept(h);
        const int b = d->budgets[static_cast<size_t>(h)];
        ASSERT_EQ(static_cast<int>(kept.size()), std::min(60, b)) << scorer << " " << allocator;
        if (b < 15) continue;
        for (int j : {0, 1, 2}) EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), j));
        for (int j = 48; j < 60; ++j) {
          EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), j))
              << scorer << " " << allocator << " head " << h << " row " << j;
        }
      }
    }
  }
  // Without the knobs, rkv keeps neither guarantee beyond the window: on keys that make the oldest
  // and the 5 rows before the window its least valued, it evicts them.
  SessionConfig c = Config(1, 1, 1, 2, 8, "rkv");
  c.budget.window = 2;
  c.scorer.pool_kernel = 1;
  std::vector<float> q = {5, 0, 5, 0};
  std::vector<float> k;
  for (int j = 0; j < 20; ++j) {
    const bool hot = j >= 5 && j < 11;
    k.push_back(hot ? 2.0f + 0.1f * static_cast<float>(j) : 0.0f);
    k.push_back(hot ? 0.0f : 1.0f);
  }
  std::vector<int32_t> lengths = {20};
  auto plain = Engine::Create(c);
  ASSERT_TRUE(plain.ok());
  auto d = (*plain)->Compress({q.data(), k.data(), 20, lengths, {}});
  ASSERT_TRUE(d.ok());
  EXPECT_THAT(d->Kept(0), ElementsAre(5, 6, 7, 8, 9, 10, 18, 19));
  c.budget.sinks = 1;
  c.budget.recent = 4;
  auto guarded = Engine::Create(c);
  ASSERT_TRUE(guarded.ok());
  d = (*guarded)->Compress({q.data(), k.data(), 20, lengths, {}});
  ASSERT_TRUE(d.ok());
  EXPECT_THAT(d->Kept(0), ElementsAre(0, 8, 9, 10, 16, 17, 18, 19));
}

TEST(Engine, RejectsLengthsOutOfRange) {
  auto engine = Engine::Create(Config(1, 1, 1, 2, 16, "snapkv"));
  ASSERT_TRUE(engine.ok());
  std::vector<float> q(16), k(8);
  std::vector<int32_t> lengths = {5};
  EXPECT_EQ((*engine)->Compress({q.data(), k.data(), 4, lengths, {}}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Engine, GatherKeptRowsCompactsAndZeroPads) {
  Decision d;
  d.num_layers = 1;
  d.num_kv_heads = 2;
  d.kept_lengths = {2, 1};
  d.kept_indices = {1, 3, 0};
  d.head_offsets = {0, 2, 3};
  // Rows are one byte wide: head 0 rows 10..13, head 1 rows 20..23.
  const unsigned char src[] = {10, 11, 12, 13, 20, 21, 22, 23};
  unsigned char dst[4];
  std::fill(std::begin(dst), std::end(dst), 0xff);
  GatherKeptRows(d, src, 4, 1, 2, dst);
  EXPECT_THAT(dst, ElementsAre(11, 13, 20, 0));
}

}  // namespace
}  // namespace reasonalloc

namespace reasonalloc {
namespace {

TEST(Engine, OverflowingLogitsAreAnErrorNotNanScores) {
  auto engine = Engine::Create(Config(1, 1, 1, 2, 9, "snapkv"));
  ASSERT_TRUE(engine.ok());
  // Finite inputs whose dot products overflow fp32.
  std::vector<float> q(8 * 2, 3e20f), k(20 * 2, 3e20f);
  std::vector<int32_t> lengths = {20};
  auto d = (*engine)->Compress({q.data(), k.data(), 20, lengths, {}});
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(d.status().message()), ::testing::HasSubstr("overflow"));
}

TEST(Engine, CancellationStopsTheEvent) {
  auto engine = Engine::Create(Config(2, 2, 2, 4, 9, "snapkv"));
  ASSERT_TRUE(engine.ok());
  std::vector<float> q(2 * 2 * 8 * 4, 0.1f), k(2 * 2 * 30 * 4, 0.2f);
  std::vector<int32_t> lengths(4, 30);
  int polls = 0;
  CompressInputs in{q.data(), k.data(), 30, lengths, [&] { return ++polls > 2; }};
  // Small events are never polled (a poll costs more than they do)...
  EXPECT_TRUE((*engine)->Compress(in).ok());
  EXPECT_EQ(polls, 0);
  // ...large ones are, between heads.
  in.cancel_poll_work = 1;
  auto d = (*engine)->Compress(in);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(polls, 3);
}

TEST(Engine, WorkBeyondTheLimitIsRefusedUpFront) {
  // One layer, 1024 query heads on one kv head, window 1024, d 1024: 2^30 per candidate token...
  // times 100 tokens is above 2^36. The keys are never read, so no large buffers are needed.
  SessionConfig c = Config(1, 1024, 1, 1024, 1025, "snapkv");
  c.budget.window = 1024;
  auto engine = Engine::Create(c);
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::vector<int32_t> lengths = {1024 + 100};
  float dummy = 0;
  auto d = (*engine)->Compress({&dummy, &dummy, 1124, lengths, {}});
  EXPECT_EQ(d.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(d.status().message()), ::testing::HasSubstr("multiply-adds"));
}

}  // namespace
}  // namespace reasonalloc

#include "core/quality.h"

namespace reasonalloc {
namespace {

TEST(Quality, HandWorkedRecallAndOutputError) {
  // One head, d = 1, 3 tokens with keys 0, ln 2, ln 7 and values 1, 2, 3; the later query is 1:
  // attention 1 : 2 : 7 over 10. Keeping {1, 2}: recall 0.9; o_full = (1 + 4 + 21) / 10 = 2.6,
  // o_S = (4 + 21) / 9 = 25/9, error |25/9 − 2.6| / 2.6.
  ModelGeometry m{"m", 1, 1, 1, 1, DType::kFloat32, 64};
  Decision d;
  d.num_layers = 1;
  d.num_kv_heads = 1;
  d.budgets = {2};
  d.kept_lengths = {2};
  d.kept_indices = {1, 2};
  d.head_offsets = {0, 2};
  const float later[] = {1};
  const float keys[] = {0, std::log(2.0f), std::log(7.0f)};
  const float values[] = {1, 2, 3};
  const int32_t lengths[] = {3};
  const Quality q = MeasureQuality(m, d, later, 1, keys, values, 3, lengths, 0.93);
  EXPECT_NEAR(q.recall, 0.9, 1e-6);
  EXPECT_NEAR(q.output_error, std::abs(25.0 / 9 - 2.6) / 2.6, 1e-6);
  EXPECT_EQ(q.recall_at_rho, 0.0);
  EXPECT_EQ(q.samples, 1);
  EXPECT_EQ(q.budget_spread, 1.0);
}

// A backend that scores a batch of events with the CPU scorer, one event after another, and
// counts its calls: RunBatch must give each event of a batch what Engine::Compress gives it alone,
// with one Score, at most one PoolCounts and one Select per batch.
class ReplayBackend final : public ComputeBackend {
 public:
  ReplayBackend(const SessionConfig& c, std::vector<const RandomInputs*> events)
      : config_(c), events_(std::move(events)), scorer_(MakeScorer(c.scorer).value()) {}
  absl::Status Score() override {
    ++score_calls;
    const ModelGeometry& m = config_.model;
    const int window = config_.budget.window;
    for (const RandomInputs* in : events_) {
      for (int64_t head = 0; head < m.num_heads_total(); ++head) {
        const int64_t l = head / m.num_kv_heads, h = head % m.num_kv_heads;
        HeadInputs hi;
        hi.queries =
            in->q.data() + ((l * m.num_q_heads + h * m.group_size()) * window) * m.head_dim;
        hi.keys = in->k.data() + head * in->n_max * m.head_dim;
        hi.n = in->lengths[static_cast<size_t>(head)];
        hi.group = m.group_size();
        hi.window = window;
        hi.head_dim = m.head_dim;
        std::vector<float> s(static_cast<size_t>(std::max(0, hi.n - window)));
        if (!s.empty()) scorer_->ScoreHead(hi, s);
        ProtectScores(hi.n, window, EffectiveSinks(config_), EffectiveRecent(config_), s);
        scores_.push_back(std::move(s));
      }
    }
    return absl::OkStatus();
  }
  absl::Status PoolCounts(std::span<const int64_t> k, std::span<int64_t> greater,
                          std::span<int64_t> equal) override {
    ++count_calls;
    const size_t heads = static_cast<size_t>(config_.model.num_kv_heads);
    const size_t L = k.size();
    for (size_t e = 0; e < events_.size(); ++e) {
      for (size_t l = 0; l < L; ++l) {
        const size_t first = (e * L + l) * heads;
        CountLayerPool(std::span<const std::vector<float>>(scores_).subspan(first, heads), k[l],
                       greater.data() + first, equal.data() + first);
      }
    }
    return absl::OkStatus();
  }
  absl::Status Select(std::span<Decision> decisions) override {
    ++select_calls;
    const int64_t hl = config_.model.num_heads_total();
    for (size_t e = 0; e < decisions.size(); ++e) {
      Decision& d = decisions[e];
      for (int64_t head = 0; head < hl; ++head) {
        SelectHeadInto(scores_[e * static_cast<size_t>(hl) + static_cast<size_t>(head)],
                       events_[e]->lengths[static_cast<size_t>(head)],
                       d.budgets[static_cast<size_t>(head)], config_.budget.window,
                       d.kept_indices.data() + d.head_offsets[static_cast<size_t>(head)]);
      }
    }
    return absl::OkStatus();
  }
  int score_calls = 0, count_calls = 0, select_calls = 0;

 private:
  const SessionConfig& config_;
  std::vector<const RandomInputs*> events_;
  std::unique_ptr<Scorer> scorer_;
  std::vector<std::vector<float>> scores_;
};

TEST(Engine, ABatchThroughABackendDecidesEachEventAsTheEngineDoesAlone) {
  std::mt19937 rng(3);
  for (const char* allocator : {"uniform", "pyramid", "adakv", "reasonalloc"}) {
    SessionConfig c = Config(3, 4, 2, 8, 12, "rkv");
    c.budget.window = 4;
    c.allocator.kind = ParseAllocator(allocator).value();
    const std::vector<double> demand = {1.0, 3.0, 0.5};
    auto engine = Engine::Create(c, demand);
    ASSERT_TRUE(engine.ok()) << engine.status();
    const RandomInputs a = MakeInputs(c, 40, rng), b = MakeInputs(c, 40, rng),
                       e3 = MakeInputs(c, 40, rng);
    ReplayBackend backend(c, {&a, &b, &e3});
    const std::vector<std::span<const int32_t>> lengths = {a.lengths, b.lengths, e3.lengths};
    auto batch = RunBatch(c, demand, lengths, backend);
    ASSERT_TRUE(batch.ok()) << batch.status();
    ASSERT_EQ(batch->size(), 3u);
    EXPECT_EQ(backend.score_calls, 1);
    EXPECT_EQ(backend.select_calls, 1);
    EXPECT_EQ(backend.count_calls, UsesPoolCounts(c) ? 1 : 0) << allocator;
    int i = 0;
    for (const RandomInputs* in : {&a, &b, &e3}) {
      auto alone = (*engine)->Compress(in->view());
      ASSERT_TRUE(alone.ok()) << alone.status();
      const Decision& got = (*batch)[static_cast<size_t>(i++)];
      EXPECT_EQ(got.budgets, alone->budgets) << allocator;
      EXPECT_EQ(got.kept_lengths, alone->kept_lengths) << allocator;
      EXPECT_EQ(got.kept_indices, alone->kept_indices) << allocator;
      EXPECT_EQ(got.head_offsets, alone->head_offsets) << allocator;
      EXPECT_EQ(got.evicted_tokens, alone->evicted_tokens) << allocator;
    }
  }
}

}  // namespace
}  // namespace reasonalloc
