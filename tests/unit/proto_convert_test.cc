#include "server/proto_convert.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;

v1::CreateSessionRequest Minimal() {
  v1::CreateSessionRequest r;
  r.mutable_model()->set_num_layers(2);
  r.mutable_model()->set_dtype(v1::DTYPE_BFLOAT16);
  return r;
}

TEST(ProtoConvert, UnsetFieldsTakeTheSpecDefaults) {
  auto c = SessionConfigFromProto(Minimal());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model.dtype, DType::kBFloat16);
  EXPECT_EQ(c->budget.budget, 512);
  EXPECT_EQ(c->budget.buffer, 128);
  EXPECT_EQ(c->budget.window, 8);
  EXPECT_FALSE(c->budget.sinks.has_value());  // the scorer's default
  EXPECT_EQ(c->budget.recent, 0);
  EXPECT_EQ(c->scorer.kind, ScorerKind::kSnapKv);
  EXPECT_EQ(c->allocator.kind, AllocatorKind::kUniform);
  EXPECT_TRUE(c->managed);
  EXPECT_EQ(c->allocator.reasonalloc_mode, ReasonAllocMode::kFull);
}

TEST(ProtoConvert, ExplicitZeroSinksAndKnobsAreKept) {
  auto r = Minimal();
  r.mutable_budget()->set_sinks(0);
  r.mutable_scorer()->set_lambda(0.0);
  r.mutable_scorer()->set_pool_kind(v1::POOL_KIND_AVG);
  r.mutable_scorer()->set_gqa_reduce(v1::GQA_REDUCE_MEAN);
  r.set_mode(v1::SESSION_MODE_ADVISORY);
  auto c = SessionConfigFromProto(r);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->budget.sinks, 0);
  EXPECT_EQ(c->scorer.lambda, 0.0);
  r.mutable_budget()->set_sinks(2);
  r.mutable_budget()->set_recent(24);
  auto d = SessionConfigFromProto(r);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->budget.sinks, 2);
  EXPECT_EQ(d->budget.recent, 24);
  EXPECT_EQ(c->scorer.pool_kind, PoolKind::kAvg);
  EXPECT_EQ(c->scorer.gqa_reduce, GqaReduce::kMean);
  EXPECT_FALSE(c->managed);
}

TEST(ProtoConvert, OpenEnumValuesAreRejectedByName) {
  auto r = Minimal();
  r.mutable_scorer()->set_pool_kind(static_cast<v1::PoolKind>(17));
  EXPECT_THAT(std::string(SessionConfigFromProto(r).status().message()),
              HasSubstr("scorer.pool_kind = 17"));
  r = Minimal();
  r.mutable_model()->set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_THAT(std::string(SessionConfigFromProto(r).status().message()),
              HasSubstr("model.dtype is unspecified"));
}

TEST(ProtoConvert, RoundTripsTheConfiguration) {
  auto c = SessionConfigFromProto(Minimal());
  ASSERT_TRUE(c.ok());
  v1::CreateSessionRequest back;
  SessionConfigToProto(*c, back.mutable_model(), back.mutable_budget(), back.mutable_scorer(),
                       back.mutable_allocator());
  auto again = SessionConfigFromProto(back);
  ASSERT_TRUE(again.ok());
  // Defaults come back explicit: snapkv's sinks 0 and the window as the recent span.
  EXPECT_EQ(back.budget().sinks(), 0);
  EXPECT_EQ(back.budget().recent(), 8);
  EXPECT_EQ(EffectiveSinks(*again), EffectiveSinks(*c));
  EXPECT_EQ(EffectiveRecent(*again), EffectiveRecent(*c));
  EXPECT_EQ(again->scorer.pool_kernel, c->scorer.pool_kernel);
  EXPECT_EQ(again->allocator.clip_high, c->allocator.clip_high);
}

TEST(ProtoConvert, DecisionMaskWords) {
  Decision d;
  d.num_layers = 1;
  d.num_kv_heads = 2;
  d.budgets = {3, 3};
  d.kept_lengths = {2, 1};
  d.kept_indices = {0, 65, 64};
  d.head_offsets = {0, 2, 3};
  v1::Decision out;
  DecisionToProto(d, 70, true, &out);
  ASSERT_EQ(out.words_per_head(), 2);
  ASSERT_EQ(out.keep_mask().size(), 4u * 8);
  uint64_t w[4];
  std::memcpy(w, out.keep_mask().data(), sizeof(w));
  EXPECT_EQ(w[0], 1u);
  EXPECT_EQ(w[1], 2u);
  EXPECT_EQ(w[2], 0u);
  EXPECT_EQ(w[3], 1u);
  v1::Decision no_mask;
  DecisionToProto(d, 70, false, &no_mask);
  EXPECT_TRUE(no_mask.keep_mask().empty());
  EXPECT_EQ(no_mask.kept_indices_size(), 3);
}

TEST(ProtoConvert, ACompressCallKeepsATensorItCannotConvertForThePlaneToReport) {
  v1::CompressRequest r;
  r.set_session_id("s");
  r.set_step(3);
  auto* in = r.mutable_inline_tensors();
  in->mutable_query_window()->set_dtype(v1::DTYPE_FLOAT32);
  in->mutable_keys()->set_dtype(static_cast<v1::DType>(99));
  in->mutable_attention()->set_dtype(static_cast<v1::DType>(98));
  in->add_lengths(5);
  const CompressCall call = CompressCallFromProto(r);
  EXPECT_EQ(call.session_id, "s");
  EXPECT_EQ(call.step, 3);
  ASSERT_TRUE(call.inline_tensors.has_value());
  const InlineTensorsIn& t = *call.inline_tensors;
  EXPECT_TRUE(t.query_window.present);
  EXPECT_TRUE(t.keys.present) << "an unconvertible tensor is still present";
  EXPECT_FALSE(t.values.present);
  EXPECT_EQ(t.decode_error.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.decode_error.message()), HasSubstr("inline_tensors.keys.dtype"));
  EXPECT_TRUE(t.attention.present);
  EXPECT_THAT(std::string(t.attention_error.message()),
              HasSubstr("inline_tensors.attention.dtype"));
  EXPECT_EQ(t.lengths.size(), 1u);
  // Nothing unconvertible: no errors.
  in->mutable_keys()->set_dtype(v1::DTYPE_FLOAT16);
  in->clear_attention();
  const CompressCall fine = CompressCallFromProto(r);
  EXPECT_TRUE(fine.inline_tensors->decode_error.ok());
  EXPECT_TRUE(fine.inline_tensors->attention_error.ok());
  EXPECT_FALSE(fine.inline_tensors->attention.present);
}

TEST(ProtoConvert, AStreamItemsErrorFitsItsReserve) {
  v1::CompressResult result;
  result.mutable_response()->set_session_id("s");
  StreamItemError(absl::InvalidArgumentError(std::string(5000, 'x')), &result);
  EXPECT_FALSE(result.has_response());
  EXPECT_EQ(result.error().code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(result.error().message(), HasSubstr("[cut]"));
  EXPECT_LE(result.ByteSizeLong() + 16, kStreamItemReserve);
  StreamItemError(absl::NotFoundError("short"), &result);
  EXPECT_EQ(result.error().message(), "short");
}

}  // namespace
}  // namespace reasonalloc
