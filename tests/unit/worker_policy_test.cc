// The policy names of the worker and the benchmarks: scorer/allocator[-mode][+sN][+rN][+lX]
// [@profile], parsed once and written back the same way, and the session each one asks for.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "worker/driver.h"

namespace reasonalloc::worker {
namespace {

using ::testing::HasSubstr;

TEST(ParsePolicy, ReadsEveryKnobAndWritesTheSameName) {
  auto p = ParsePolicy("rkv/reasonalloc-full+s4+r32+l0.07@mymodel.sensitivity");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->scorer, ScorerKind::kRkv);
  EXPECT_EQ(p->allocator, AllocatorKind::kReasonAlloc);
  EXPECT_EQ(p->reasonalloc_mode, ReasonAllocMode::kFull);
  EXPECT_EQ(p->sinks, 4);
  EXPECT_EQ(p->recent, 32);
  EXPECT_DOUBLE_EQ(p->lambda, 0.07);
  EXPECT_EQ(p->profile, "mymodel.sensitivity");
  EXPECT_EQ(p->Name(), "rkv/reasonalloc-full+s4+r32+l0.07@mymodel.sensitivity");
  for (const char* name : {"streaming/uniform", "snapkv/adakv", "h2o/pyramid+s0",
                           "rkv/reasonalloc-head+r16", "snapkv/reasonalloc-layer@p"}) {
    auto q = ParsePolicy(name);
    ASSERT_TRUE(q.ok()) << name << ": " << q.status();
    EXPECT_EQ(q->Name(), name);
  }
}

TEST(ParsePolicy, DefaultsAreLeftToTheSidecar) {
  auto p = ParsePolicy("snapkv/uniform");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->sinks, -1);
  EXPECT_EQ(p->recent, 0);
  EXPECT_EQ(p->lambda, 0);
  EXPECT_TRUE(p->profile.empty());
  ModelConfig c;
  c.layers = 2;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.head_dim = 8;
  c.embd = 32;
  c.context = 512;
  auto r = SessionRequest(c, "m", *p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->budget().has_sinks());  // the scorer's default
  EXPECT_EQ(r->budget().recent(), 0);
  EXPECT_FALSE(r->scorer().has_lambda());
  auto q = ParsePolicy("rkv/reasonalloc-full+s2+r24+l0.2@other");
  ASSERT_TRUE(q.ok());
  r = SessionRequest(c, "m", *q);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->budget().sinks(), 2);
  EXPECT_EQ(r->budget().recent(), 24);
  EXPECT_DOUBLE_EQ(r->scorer().lambda(), 0.2);
  EXPECT_EQ(r->allocator().profile(), "other");
}

TEST(ParsePolicy, BadNamesAreErrorsThatShowTheSyntax) {
  for (const char* bad : {"", "rkv", "rkv/", "/uniform", "rkv/uniform+", "rkv/uniform+x3",
                          "rkv/uniform+s-1", "rkv/uniform+sx", "rkv/uniform+l0", "rkv/uniform+l2",
                          "rkv/uniform@", "rkv/uniform@bad name", "rkv/uniform@.hidden",
                          "magic/uniform", "rkv/fair", "rkv/reasonalloc-both"}) {
    auto p = ParsePolicy(bad);
    ASSERT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(p.status().message()), HasSubstr("scorer/allocator")) << bad;
  }
}

}  // namespace
}  // namespace reasonalloc::worker
