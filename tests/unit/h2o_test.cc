// The h2o accumulator (docs/algorithms.md §2.2) on cases worked out by hand.
#include "core/h2o.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace reasonalloc {
namespace {

TEST(AddWindowAttention, CausalRowsAndFirstRow) {
  // d = 1, window 2, keys 0, ln2, ln3, q = 1 in both rows. Row 0 sits at position 1 and sees keys
  // 0..1: [1, 2] / 3. Row 1 sits at position 2 and sees all: [1, 2, 3] / 6.
  const std::vector<float> q = {1.0f, 1.0f};
  const std::vector<float> k = {0.0f, std::log(2.0f), std::log(3.0f)};
  std::vector<float> acc(3, 0.0f);
  ASSERT_TRUE(AddWindowAttention(q.data(), k.data(), 3, 1, 2, 1, 0, acc.data()));
  EXPECT_NEAR(acc[0], 1.0 / 3 + 1.0 / 6, 1e-6);
  EXPECT_NEAR(acc[1], 2.0 / 3 + 2.0 / 6, 1e-6);
  EXPECT_NEAR(acc[2], 3.0 / 6, 1e-6);
  // Only the newest row.
  std::vector<float> newest(3, 0.0f);
  ASSERT_TRUE(AddWindowAttention(q.data(), k.data(), 3, 1, 2, 1, 1, newest.data()));
  EXPECT_NEAR(newest[0], 1.0 / 6, 1e-6);
  EXPECT_NEAR(newest[2], 3.0 / 6, 1e-6);
}

TEST(AddWindowAttention, GroupMean) {
  // Group 2, window 1, keys 0 and ln2: head q = 1 gives [1, 2] / 3, head q = -1 gives [2, 1] / 3;
  // the mean is [1/2, 1/2].
  const std::vector<float> q = {1.0f, -1.0f};
  const std::vector<float> k = {0.0f, std::log(2.0f)};
  std::vector<float> acc(2, 0.0f);
  ASSERT_TRUE(AddWindowAttention(q.data(), k.data(), 2, 2, 1, 1, 0, acc.data()));
  EXPECT_NEAR(acc[0], 0.5, 1e-6);
  EXPECT_NEAR(acc[1], 0.5, 1e-6);
}

SessionConfig OneHead(int budget) {
  SessionConfig c;
  c.model = {"h2o", 1, 1, 1, 1, DType::kFloat32, 4096};
  c.budget.budget = budget;
  c.budget.window = 1;
  c.scorer.kind = ScorerKind::kH2o;
  return c;
}

TEST(H2oAccumulator, KeptTokensCarryTheirValueNewOnesStartAtZero) {
  const SessionConfig c = OneHead(3);
  auto engine = Engine::Create(c);
  ASSERT_TRUE(engine.ok()) << engine.status();
  H2oAccumulator h2o(c.model, 1);
  const std::vector<float> q = {0.0f};
  std::vector<float> k(4, 0.0f);
  std::vector<int32_t> lengths = {4};
  CompressInputs in{q.data(), k.data(), 4, lengths, {}};
  // Worker-supplied attention: candidates 0.5, 0.1, 0.9 -> keep 0 and 2, plus the window token 3.
  const std::vector<float> attention = {0.5f, 0.1f, 0.9f, 0.2f};
  auto acc = h2o.Prepare(in, attention.data(), 10);
  ASSERT_TRUE(acc.ok()) << acc.status();
  in.accumulated = acc->data();
  auto d = (*engine)->Compress(in);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(std::vector<int32_t>(d->Kept(0).begin(), d->Kept(0).end()),
            (std::vector<int32_t>{0, 2, 3}));
  h2o.Commit(*d, *acc, 4, 10);
  EXPECT_EQ(h2o.carried(0), 3);

  // Next event: the three kept tokens then two new ones; carried 0.5, 0.9, 0.2 plus new attention.
  std::vector<float> k2(5, 0.0f);
  lengths = {5};
  CompressInputs in2{q.data(), k2.data(), 5, lengths, {}};
  const std::vector<float> attention2 = {0.0f, 0.0f, 0.0f, 0.6f, 0.0f};
  auto acc2 = h2o.Prepare(in2, attention2.data(), 20);
  ASSERT_TRUE(acc2.ok());
  EXPECT_EQ(*acc2, (std::vector<float>{0.5f, 0.9f, 0.2f, 0.6f, 0.0f}));

  // Fewer rows than the head kept: the worker lost track of the compacted order.
  lengths = {2};
  CompressInputs short_in{q.data(), k2.data(), 5, lengths, {}};
  auto bad = h2o.Prepare(short_in, nullptr, 30);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(bad.status().message().find("inline_tensors.lengths[0]"), std::string::npos);

  // Negative or non-finite attention is refused with the element named.
  lengths = {5};
  const std::vector<float> negative = {0.0f, -1.0f, 0.0f, 0.0f, 0.0f};
  auto neg = h2o.Prepare(in2, negative.data(), 30);
  EXPECT_EQ(neg.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(neg.status().message().find("inline_tensors.attention: element 1"), std::string::npos);
}

TEST(H2oAccumulator, WindowRowsSinceTheLastEvent) {
  // Without worker attention, an event adds min(window, step - last step) newest window rows.
  SessionConfig c = OneHead(3);
  c.budget.window = 2;
  H2oAccumulator h2o(c.model, 2);
  const std::vector<float> q = {1.0f, 1.0f};
  const std::vector<float> k = {0.0f, std::log(2.0f), std::log(3.0f)};
  std::vector<int32_t> lengths = {3};
  CompressInputs in{q.data(), k.data(), 3, lengths, {}};
  auto first = h2o.Prepare(in, nullptr, 5);  // first event: both rows
  ASSERT_TRUE(first.ok());
  EXPECT_NEAR((*first)[2], 0.5, 1e-6);
  EXPECT_NEAR((*first)[0], 1.0 / 3 + 1.0 / 6, 1e-6);
  Decision keep_all = KeepAll(1, 1, lengths);
  h2o.Commit(keep_all, *first, 3, 5);
  auto next = h2o.Prepare(in, nullptr, 6);  // one step later: only the newest row is new
  ASSERT_TRUE(next.ok());
  EXPECT_NEAR((*next)[0], (*first)[0] + 1.0 / 6, 1e-6);
  EXPECT_NEAR((*next)[2], (*first)[2] + 0.5, 1e-6);
}

}  // namespace
}  // namespace reasonalloc
