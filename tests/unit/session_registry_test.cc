#include "server/session_registry.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;

SessionConfig Small() {
  SessionConfig c;
  c.model = {"m", 2, 4, 2, 8, DType::kFloat16, 1024};
  c.budget.budget = 32;
  return c;
}

SessionRegistry::Options Opts(uint64_t capacity) {
  SessionRegistry::Options o;
  o.capacity_bytes = capacity;
  o.reap_interval = absl::Milliseconds(10);
  return o;
}

TEST(SessionRegistry, CapacityIsAccountedAndNeverOversubscribed) {
  const uint64_t one = ComputeArenaBytes(Small()).total();
  SessionRegistry reg(Opts(2 * one + one / 2));
  auto a = reg.Create(Small(), "a", absl::Seconds(60));
  auto b = reg.Create(Small(), "b", absl::Seconds(60));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(reg.reserved_bytes(), 2 * one);
  auto c = reg.Create(Small(), "c", absl::Seconds(60));
  ASSERT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("arena bytes"));
  // Admitted sessions are untouched.
  EXPECT_EQ(reg.size(), 2);
  EXPECT_TRUE(reg.Get((*a)->id()).ok());
  // Closing gives the bytes back, and closing again is fine.
  EXPECT_EQ(*reg.Close((*a)->id()), one);
  EXPECT_EQ(*reg.Close((*a)->id()), 0u);
  EXPECT_EQ(reg.reserved_bytes(), one);
  EXPECT_TRUE(reg.Create(Small(), "c", absl::Seconds(60)).ok());
}

TEST(SessionRegistry, UnknownSessionIsNotFound) {
  SessionRegistry reg(Opts(1 << 30));
  auto s = reg.Get("nope");
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("session_id \"nope\""));
}

TEST(SessionRegistry, LapsedLeaseIsReclaimedAndAccountedBack) {
  std::atomic<int> expired{0};
  SessionRegistry reg(Opts(1 << 30), [&](Session&, const char* why) {
    if (std::string(why) == "expired") ++expired;
  });
  auto s = reg.Create(Small(), "", absl::Milliseconds(50));
  auto keep = reg.Create(Small(), "", absl::Seconds(60));
  ASSERT_TRUE(s.ok() && keep.ok());
  const std::string id = (*s)->id();
  s->reset();
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(expired.load(), 1);
  EXPECT_EQ(reg.Get(id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(reg.reserved_bytes(), ComputeArenaBytes(Small()).total());
}

TEST(SessionRegistry, ALapsedLeaseIsNeverRevived) {
  SessionRegistry::Options o = Opts(1 << 30);
  o.reap_interval = absl::Hours(1);  // the reaper never runs during the test
  SessionRegistry reg(o);
  auto s = reg.Create(Small(), "", absl::Milliseconds(50));
  ASSERT_TRUE(s.ok());
  absl::SleepFor(absl::Milliseconds(120));
  EXPECT_EQ(reg.Get((*s)->id()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(reg.Get((*s)->id(), SessionRegistry::Renew::kNo).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(SessionRegistry, OversizedIdsAreRejectedWithoutEcho) {
  SessionRegistry reg(Opts(1 << 30));
  auto s = reg.Get(std::string(5000, 'x'));
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_LT(s.status().message().size(), 200u);
  EXPECT_EQ(reg.Close("").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SessionRegistry, UseRenewsTheLease) {
  SessionRegistry reg(Opts(1 << 30));
  auto s = reg.Create(Small(), "", absl::Milliseconds(150));
  ASSERT_TRUE(s.ok());
  const std::string id = (*s)->id();
  for (int i = 0; i < 6; ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    ASSERT_TRUE(reg.Get(id).ok()) << "renewal " << i;
  }
}

TEST(SessionRegistry, LeaseBounds) {
  SessionRegistry reg(Opts(1 << 30));
  EXPECT_EQ(*reg.LeaseFor(0, "lease_seconds"), absl::Seconds(60));
  EXPECT_EQ(*reg.LeaseFor(2.5, "lease_seconds"), absl::Seconds(2.5));
  for (double bad : {-1.0, 1e9, std::nan("")}) {
    auto l = reg.LeaseFor(bad, "lease_seconds");
    EXPECT_EQ(l.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(l.status().message()), HasSubstr("lease_seconds"));
  }
}

TEST(SessionRegistry, OneCompressAtATimePerSession) {
  SessionRegistry reg(Opts(1 << 30));
  auto s = reg.Create(Small(), "", absl::Seconds(60));
  ASSERT_TRUE(s.ok());
  {
    auto first = (*s)->BeginCompress();
    ASSERT_TRUE(first.ok());
    auto second = (*s)->BeginCompress();
    EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(second.status().message()), HasSubstr("already has a Compress"));
  }
  EXPECT_TRUE((*s)->BeginCompress().ok());  // released with the guard
}

TEST(SessionRegistry, StepsMustIncrease) {
  SessionRegistry reg(Opts(1 << 30));
  auto s = reg.Create(Small(), "", absl::Seconds(60));
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE((*s)->CheckStep(0).ok());
  EXPECT_EQ((*s)->CheckStep(-1).code(), absl::StatusCode::kInvalidArgument);
  Decision d;
  d.budgets.assign(4, 32);
  d.kept_lengths.assign(4, 10);
  const auto first = (*s)->Commit(5, d);
  EXPECT_EQ(first.epoch, 1u);
  EXPECT_EQ(first.kept_delta, 40);
  EXPECT_EQ((*s)->CheckStep(5).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE((*s)->CheckStep(6).ok());
}

TEST(SessionRegistry, ReleasedSessionsStopCountingKeptTokens) {
  SessionRegistry reg(Opts(1 << 30));
  auto s = reg.Create(Small(), "", absl::Seconds(60));
  ASSERT_TRUE(s.ok());
  Decision d;
  d.budgets.assign(4, 32);
  d.kept_lengths.assign(4, 10);
  EXPECT_EQ((*s)->Commit(1, d).kept_delta, 40);
  EXPECT_EQ((*s)->Release(), 40);
  // An event that finishes after the session left (e.g. its lease lapsed mid-call) changes nothing.
  d.kept_lengths.assign(4, 20);
  const auto late = (*s)->Commit(2, d);
  EXPECT_EQ(late.epoch, 2u);
  EXPECT_EQ(late.kept_delta, 0);
}

TEST(SessionRegistry, UpdateBudgetReaccounts) {
  const uint64_t one = ComputeArenaBytes(Small()).total();
  SessionRegistry reg(Opts(one + one / 4));
  auto s = reg.Create(Small(), "", absl::Seconds(60));
  ASSERT_TRUE(s.ok());
  auto smaller = reg.UpdateBudget((*s)->id(), 16);
  ASSERT_TRUE(smaller.ok()) << smaller.status();
  SessionConfig at16 = Small();
  at16.budget.budget = 16;
  EXPECT_EQ(reg.reserved_bytes(), ComputeArenaBytes(at16).total());
  EXPECT_LE(reg.reserved_bytes(), one);
  EXPECT_EQ((*s)->engine()->config().budget.budget, 16);
  EXPECT_EQ(reg.UpdateBudget((*s)->id(), 512).status().code(),
            absl::StatusCode::kResourceExhausted);
  const absl::Status too_small = reg.UpdateBudget((*s)->id(), 4).status();
  EXPECT_EQ(too_small.code(), absl::StatusCode::kInvalidArgument);
  // The request's field is `budget` (the session's budget.budget is what it replaces).
  EXPECT_EQ(too_small.message().rfind("budget = 4 is smaller than budget.window", 0), 0u)
      << too_small;
  EXPECT_EQ((*s)->engine()->config().budget.budget, 16);
}

TEST(SessionRegistry, ConcurrentCreatesNeverExceedCapacity) {
  const uint64_t one = ComputeArenaBytes(Small()).total();
  SessionRegistry reg(Opts(10 * one));
  std::atomic<int> admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 5; ++i) {
        if (reg.Create(Small(), "", absl::Seconds(60)).ok()) ++admitted;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(admitted.load(), 10);
  EXPECT_EQ(reg.reserved_bytes(), 10 * one);
}

TEST(SessionIds, AreRandomHex) {
  const std::string a = NewSessionId();
  EXPECT_EQ(a.size(), 32u);
  EXPECT_EQ(a.find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_NE(a, NewSessionId());
}

}  // namespace
}  // namespace reasonalloc
