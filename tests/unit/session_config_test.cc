#include "core/session_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <functional>

#include "core/allocator.h"
#include "core/policy.h"
#include "core/scorer.h"
#include "core/status_macros.h"

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;

SessionConfig Valid() {
  SessionConfig c;
  c.model = {"m", 4, 8, 2, 16, DType::kFloat16, 4096};
  c.budget.budget = 64;
  return c;
}

struct BadCase {
  const char* name;
  std::function<void(SessionConfig&)> mutate;
  absl::StatusCode code;
  const char* field;
};

TEST(SessionConfig, DefaultsMatchTheSpec) {
  SessionConfig c;
  EXPECT_EQ(c.budget.budget, 512);
  EXPECT_EQ(c.budget.buffer, 128);
  EXPECT_EQ(c.budget.window, 8);
  EXPECT_FALSE(c.budget.sinks.has_value());
  EXPECT_EQ(EffectiveSinks(c), 0);  // snapkv: none unless asked
  c.scorer.kind = ScorerKind::kStreaming;
  EXPECT_EQ(EffectiveSinks(c), 4);
  c.budget.sinks = 0;
  EXPECT_EQ(EffectiveSinks(c), 0);
  EXPECT_EQ(c.budget.recent, 0);
  EXPECT_EQ(EffectiveRecent(c), 8);  // the window
  EXPECT_EQ(c.scorer.pool_kernel, 7);
  EXPECT_DOUBLE_EQ(c.scorer.lambda, 0.1);
  EXPECT_DOUBLE_EQ(c.scorer.threshold, 0.5);
  EXPECT_DOUBLE_EQ(c.allocator.pyramid_beta, 20);
  EXPECT_DOUBLE_EQ(c.allocator.adakv_floor, 0.2);
  EXPECT_TRUE(ValidateSessionConfig(Valid()).ok());
}

TEST(SessionConfig, RejectsBadFieldsNamingThem) {
  const BadCase cases[] = {
      {"zero layers", [](auto& c) { c.model.num_layers = 0; }, absl::StatusCode::kInvalidArgument,
       "model.num_layers"},
      {"negative layers", [](auto& c) { c.model.num_layers = -3; },
       absl::StatusCode::kInvalidArgument, "model.num_layers"},
      {"zero q heads", [](auto& c) { c.model.num_q_heads = 0; }, absl::StatusCode::kInvalidArgument,
       "model.num_q_heads"},
      {"zero kv heads", [](auto& c) { c.model.num_kv_heads = 0; },
       absl::StatusCode::kInvalidArgument, "model.num_kv_heads"},
      {"negative dim", [](auto& c) { c.model.head_dim = -1; }, absl::StatusCode::kInvalidArgument,
       "model.head_dim"},
      {"zero context", [](auto& c) { c.model.max_context = 0; }, absl::StatusCode::kInvalidArgument,
       "model.max_context"},
      {"hq not multiple", [](auto& c) { c.model.num_q_heads = 7; },
       absl::StatusCode::kInvalidArgument, "not a multiple of model.num_kv_heads"},
      {"budget below window+1", [](auto& c) { c.budget.budget = 8; },
       absl::StatusCode::kInvalidArgument, "budget.budget"},
      {"budget above context", [](auto& c) { c.budget.budget = 5000; },
       absl::StatusCode::kInvalidArgument, "model.max_context"},
      {"zero window", [](auto& c) { c.budget.window = 0; }, absl::StatusCode::kInvalidArgument,
       "budget.window"},
      {"zero buffer", [](auto& c) { c.budget.buffer = 0; }, absl::StatusCode::kInvalidArgument,
       "budget.buffer"},
      {"negative sinks", [](auto& c) { c.budget.sinks = -1; }, absl::StatusCode::kInvalidArgument,
       "budget.sinks"},
      {"negative recent", [](auto& c) { c.budget.recent = -3; }, absl::StatusCode::kInvalidArgument,
       "budget.recent"},
      {"recent and sinks beyond the budget",
       [](auto& c) {
         c.budget.sinks = 4;
         c.budget.recent = c.budget.budget - 3;
       },
       absl::StatusCode::kInvalidArgument, "budget.sinks + budget.recent"},
      {"scorer kind outside the registry",
       [](auto& c) { c.scorer.kind = static_cast<ScorerKind>(200); },
       absl::StatusCode::kInvalidArgument, "scorer.name"},
      {"allocator kind outside the registry",
       [](auto& c) { c.allocator.kind = static_cast<AllocatorKind>(200); },
       absl::StatusCode::kInvalidArgument, "allocator.name"},
      {"even kernel", [](auto& c) { c.scorer.pool_kernel = 4; }, absl::StatusCode::kInvalidArgument,
       "scorer.pool_kernel"},
      {"lambda > 1", [](auto& c) { c.scorer.lambda = 1.5; }, absl::StatusCode::kInvalidArgument,
       "scorer.lambda"},
      {"nan threshold", [](auto& c) { c.scorer.threshold = std::nan(""); },
       absl::StatusCode::kInvalidArgument, "scorer.threshold"},
      {"clip high < 1", [](auto& c) { c.allocator.clip_high = 0.5; },
       absl::StatusCode::kInvalidArgument, "allocator.clip_high"},
      {"mu > 1", [](auto& c) { c.allocator.head_floor = 1.5; }, absl::StatusCode::kInvalidArgument,
       "allocator.head_floor"},
  };
  for (const BadCase& bad : cases) {
    SessionConfig c = Valid();
    bad.mutate(c);
    const absl::Status s = ValidateSessionConfig(c);
    EXPECT_EQ(s.code(), bad.code) << bad.name << ": " << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(bad.field)) << bad.name;
  }
}

TEST(SessionConfig, EveryRegisteredPolicyValidates) {
  for (const ScorerPolicy& scorer : ScorerPolicies()) {
    for (const AllocatorPolicy& allocator : AllocatorPolicies()) {
      SessionConfig c = Valid();
      c.scorer.kind = scorer.kind;
      c.allocator.kind = allocator.kind;
      const absl::Status s = ValidateSessionConfig(c);
      EXPECT_TRUE(s.ok()) << scorer.name << "/" << allocator.name << ": " << s;
    }
  }
}

TEST(Policy, UnknownNamesAreRefusedNamingTheField) {
  auto scorer = ParseScorer("magic");
  EXPECT_EQ(scorer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(scorer.status().message()), HasSubstr("scorer.name \"magic\""));
  EXPECT_THAT(std::string(scorer.status().message()), HasSubstr("snapkv, streaming, h2o, rkv"));
  auto allocator = ParseAllocator("fair");
  EXPECT_EQ(allocator.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(allocator.status().message()), HasSubstr("allocator.name"));
  // The field is the caller's: a flag, a list entry.
  EXPECT_THAT(std::string(ParseScorer("", "--scorer").status().message()),
              HasSubstr("--scorer is empty"));
  EXPECT_THAT(std::string(ParseScorer(std::string(300, 'x')).status().message()),
              HasSubstr("300 bytes long"));
  EXPECT_THAT(std::string(ParseReasonAllocMode("both", "--mode").status().message()),
              HasSubstr("--mode \"both\""));
}

TEST(Policy, NamesRoundTripAndRowsDescribeTheirPolicies) {
  for (const ScorerPolicy& p : ScorerPolicies()) {
    EXPECT_EQ(ParseScorer(p.name).value(), p.kind);
    EXPECT_EQ(&PolicyOf(p.kind), &p);
    ScorerConfig config;
    config.kind = p.kind;
    auto scorer = MakeScorer(config);
    ASSERT_TRUE(scorer.ok()) << p.name;
    // Managed sessions run every scorer inline; advisory sessions never run where managed ones
    // cannot.
    EXPECT_NE(p.managed_planes & kInlinePlane, 0u) << p.name;
    EXPECT_EQ(p.advisory_planes & ~p.managed_planes, 0u) << p.name;
  }
  for (const AllocatorPolicy& p : AllocatorPolicies()) {
    EXPECT_EQ(ParseAllocator(p.name).value(), p.kind);
    EXPECT_EQ(&PolicyOf(p.kind), &p);
    AllocatorConfig c;
    c.kind = p.kind;
    // The row says what the policy may do; the class, what this configuration does.
    if (AllocatorOf(p.kind).RoutesHeads(c)) {
      EXPECT_TRUE(p.routes_heads) << p.name;
    }
    if (AllocatorOf(p.kind).UsesLayerProfile(c)) {
      EXPECT_TRUE(p.uses_layer_profile) << p.name;
    }
  }
  for (ReasonAllocMode m : {ReasonAllocMode::kFull, ReasonAllocMode::kLayer, ReasonAllocMode::kHead,
                            ReasonAllocMode::kOff}) {
    EXPECT_EQ(ParseReasonAllocMode(NameOf(m), "mode").value(), m);
  }
  // What the server, the arena layout and the engine read from the rows.
  EXPECT_TRUE(PolicyOf(ScorerKind::kH2o).needs_accumulator);
  EXPECT_EQ(PolicyOf(ScorerKind::kH2o).managed_planes & kCudaIpcPlane, 0u);
  EXPECT_EQ(PolicyOf(ScorerKind::kStreaming).default_sinks, kDefaultStreamingSinks);
  EXPECT_FALSE(PolicyOf(AllocatorKind::kUniform).reshapes_budgets);
  EXPECT_EQ(ScorerNames(), "snapkv | streaming | h2o | rkv");
  EXPECT_EQ(AllocatorNames(", "), "uniform, pyramid, adakv, reasonalloc");
}

TEST(SessionConfig, ArenaBytesAreTheLayoutsPages) {
  SessionConfig c = Valid();  // L=4 Hq=8 Hkv=2 d=16 fp16, B=64, Δ=128, α=8
  ASSERT_EQ(::sysconf(_SC_PAGESIZE), 4096);
  const ArenaBytes b = ComputeArenaBytes(c);
  EXPECT_EQ(b.kv, 2u * 4 * 2 * (64 + 128) * 16 * 2);  // 98304: whole pages already
  EXPECT_EQ(b.query_ring, 4u * 8 * 8 * 16 * 2);       // 8192
  EXPECT_EQ(b.accumulator, 0u);
  // len, offset, capacity, budget, 3 mask words per head and the epoch: 512 bytes, one page.
  EXPECT_EQ(b.result, 4096u);
  c.scorer.kind = ScorerKind::kH2o;
  EXPECT_EQ(ComputeArenaBytes(c).accumulator, 8192u);  // 4·2·192 floats + present: two pages
  c.scorer.kind = ScorerKind::kSnapKv;
  c.managed = false;  // advisory: only the result block is the server's
  EXPECT_EQ(ComputeArenaBytes(c).kv, 0u);
  EXPECT_EQ(ComputeArenaBytes(c).query_ring, 0u);
  EXPECT_EQ(ComputeArenaBytes(c).total(), 4096u);
}

TEST(WithContext, PrefixesTheWirePathAndKeepsCodeAndPayload) {
  absl::Status s = absl::InvalidArgumentError("n_max = 0 is out of range");
  s.SetPayload("type.example/x", absl::Cord("y"));
  const absl::Status named = WithContext(s, "events[2]");
  EXPECT_EQ(named.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(named.message(), "events[2]: n_max = 0 is out of range");
  EXPECT_EQ(named.GetPayload("type.example/x"), absl::Cord("y"));
  EXPECT_TRUE(WithContext(absl::OkStatus(), "events[2]").ok());
}

TEST(SessionConfig, ABudgetValueIsCheckedUnderTheCallersName) {
  const SessionConfig c = Valid();
  const absl::Status s = CheckBudgetValue(3, c.budget, c.model, "budget");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message().rfind("budget = 3 is smaller than budget.window", 0), 0u) << s;
  EXPECT_TRUE(CheckBudgetValue(c.budget.window + 1, c.budget, c.model, "budget").ok());
  EXPECT_THAT(
      std::string(CheckBudgetValue(c.model.max_context + 1, c.budget, c.model, "budget").message()),
      HasSubstr("larger than model.max_context"));
}

}  // namespace
}  // namespace reasonalloc
