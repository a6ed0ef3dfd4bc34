#include "server/proto_convert.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/policy.h"
#include "core/status_macros.h"
#include "proto/policy_enums.h"

namespace reasonalloc {

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, absl::string_view field) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return DType::kFloat32;
    case v1::DTYPE_FLOAT16:
      return DType::kFloat16;
    case v1::DTYPE_BFLOAT16:
      return DType::kBFloat16;
    case v1::DTYPE_UNSPECIFIED:
      return absl::InvalidArgumentError(absl::StrCat(
          field, " is unspecified; expected DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16"));
    case v1::DTYPE_INT32:
    case v1::DTYPE_INT64:
    case v1::DTYPE_UINT64:
      return absl::InvalidArgumentError(absl::StrCat(
          field, " = ", v1::DType_Name(dtype),
          " is an integer type of arena arrays; expected DTYPE_FLOAT32, DTYPE_FLOAT16 or "
          "DTYPE_BFLOAT16"));
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, " = ", static_cast<int>(dtype), " is not a known DType"));
  }
}

v1::DType DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return v1::DTYPE_FLOAT32;
    case DType::kFloat16:
      return v1::DTYPE_FLOAT16;
    case DType::kBFloat16:
      return v1::DTYPE_BFLOAT16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<SessionConfig> SessionConfigFromProto(const v1::CreateSessionRequest& r) {
  SessionConfig c;
  const v1::ModelGeometry& m = r.model();
  c.model.name = m.name();
  c.model.num_layers = m.num_layers();
  c.model.num_q_heads = m.num_q_heads();
  c.model.num_kv_heads = m.num_kv_heads();
  c.model.head_dim = m.head_dim();
  c.model.max_context = m.max_context();
  auto dtype = DTypeFromProto(m.dtype(), "model.dtype");
  if (!dtype.ok()) return dtype.status();
  c.model.dtype = *dtype;

  const v1::BudgetConfig& b = r.budget();
  if (b.budget() != 0) c.budget.budget = b.budget();
  if (b.buffer() != 0) c.budget.buffer = b.buffer();
  if (b.window() != 0) c.budget.window = b.window();
  if (b.has_sinks()) c.budget.sinks = b.sinks();
  c.budget.recent = b.recent();

  const v1::ScorerConfig& s = r.scorer();
  if (!s.name().empty()) {
    ASSIGN_OR_RETURN(c.scorer.kind, ParseScorer(s.name(), "scorer.name"));
  }
  if (s.pool_kernel() != 0) c.scorer.pool_kernel = s.pool_kernel();
  switch (s.pool_kind()) {
    case v1::POOL_KIND_UNSPECIFIED:
    case v1::POOL_KIND_MAX:
      c.scorer.pool_kind = PoolKind::kMax;
      break;
    case v1::POOL_KIND_AVG:
      c.scorer.pool_kind = PoolKind::kAvg;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "scorer.pool_kind = ", static_cast<int>(s.pool_kind()), " is not a known PoolKind"));
  }
  switch (s.gqa_reduce()) {
    case v1::GQA_REDUCE_UNSPECIFIED:
    case v1::GQA_REDUCE_MAX:
      c.scorer.gqa_reduce = GqaReduce::kMax;
      break;
    case v1::GQA_REDUCE_MEAN:
      c.scorer.gqa_reduce = GqaReduce::kMean;
      break;
    case v1::GQA_REDUCE_MEAN_SCORES:
      c.scorer.gqa_reduce = GqaReduce::kMeanScores;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "scorer.gqa_reduce = ", static_cast<int>(s.gqa_reduce()), " is not a known GqaReduce"));
  }
  if (s.has_lambda()) c.scorer.lambda = s.lambda();
  if (s.has_threshold()) c.scorer.threshold = s.threshold();
  c.scorer.softmax_all_keys = s.softmax_all_keys();

  const v1::AllocatorConfig& a = r.allocator();
  if (!a.name().empty()) {
    ASSIGN_OR_RETURN(c.allocator.kind, ParseAllocator(a.name(), "allocator.name"));
  }
  if (a.has_pyramid_beta()) c.allocator.pyramid_beta = a.pyramid_beta();
  if (a.has_adakv_floor()) c.allocator.adakv_floor = a.adakv_floor();
  switch (a.reasonalloc_mode()) {
    case v1::AllocatorConfig::REASONALLOC_MODE_UNSPECIFIED:
    case v1::AllocatorConfig::REASONALLOC_MODE_FULL:
      c.allocator.reasonalloc_mode = ReasonAllocMode::kFull;
      break;
    case v1::AllocatorConfig::REASONALLOC_MODE_LAYER:
      c.allocator.reasonalloc_mode = ReasonAllocMode::kLayer;
      break;
    case v1::AllocatorConfig::REASONALLOC_MODE_HEAD:
      c.allocator.reasonalloc_mode = ReasonAllocMode::kHead;
      break;
    case v1::AllocatorConfig::REASONALLOC_MODE_OFF:
      c.allocator.reasonalloc_mode = ReasonAllocMode::kOff;
      break;
    case v1::AllocatorConfig::REASONALLOC_MODE_STATIC:
      c.allocator.reasonalloc_mode = ReasonAllocMode::kStatic;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("allocator.reasonalloc_mode = ", static_cast<int>(a.reasonalloc_mode()),
                       " is not a known ReasonAllocMode"));
  }
  if (a.has_layer_exponent()) c.allocator.layer_exponent = a.layer_exponent();
  if (a.has_head_exponent()) c.allocator.head_exponent = a.head_exponent();
  if (a.has_head_floor()) c.allocator.head_floor = a.head_floor();
  if (a.has_clip_low()) c.allocator.clip_low = a.clip_low();
  if (a.has_clip_high()) c.allocator.clip_high = a.clip_high();
  c.allocator.profile = a.profile();

  switch (r.mode()) {
    case v1::SESSION_MODE_UNSPECIFIED:
    case v1::SESSION_MODE_MANAGED:
      c.managed = true;
      break;
    case v1::SESSION_MODE_ADVISORY:
      c.managed = false;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("mode = ", static_cast<int>(r.mode()), " is not a known SessionMode"));
  }
  return c;
}

void SessionConfigToProto(const SessionConfig& c, v1::ModelGeometry* m, v1::BudgetConfig* b,
                          v1::ScorerConfig* s, v1::AllocatorConfig* a) {
  m->set_name(c.model.name);
  m->set_num_layers(c.model.num_layers);
  m->set_num_q_heads(c.model.num_q_heads);
  m->set_num_kv_heads(c.model.num_kv_heads);
  m->set_head_dim(c.model.head_dim);
  m->set_dtype(DTypeToProto(c.model.dtype));
  m->set_max_context(c.model.max_context);
  b->set_budget(c.budget.budget);
  b->set_buffer(c.budget.buffer);
  b->set_window(c.budget.window);
  b->set_sinks(EffectiveSinks(c));
  b->set_recent(EffectiveRecent(c));
  s->set_name(std::string(NameOf(c.scorer.kind)));
  s->set_pool_kernel(c.scorer.pool_kernel);
  s->set_pool_kind(c.scorer.pool_kind == PoolKind::kMax ? v1::POOL_KIND_MAX : v1::POOL_KIND_AVG);
  switch (c.scorer.gqa_reduce) {
    case GqaReduce::kMax:
      s->set_gqa_reduce(v1::GQA_REDUCE_MAX);
      break;
    case GqaReduce::kMean:
      s->set_gqa_reduce(v1::GQA_REDUCE_MEAN);
      break;
    case GqaReduce::kMeanScores:
      s->set_gqa_reduce(v1::GQA_REDUCE_MEAN_SCORES);
      break;
  }
  s->set_softmax_all_keys(c.scorer.softmax_all_keys);
  s->set_lambda(c.scorer.lambda);
  s->set_threshold(c.scorer.threshold);
  a->set_name(std::string(NameOf(c.allocator.kind)));
  a->set_pyramid_beta(c.allocator.pyramid_beta);
  a->set_adakv_floor(c.allocator.adakv_floor);
  a->set_reasonalloc_mode(ReasonAllocModeToProto(c.allocator.reasonalloc_mode));
  a->set_layer_exponent(c.allocator.layer_exponent);
  a->set_head_exponent(c.allocator.head_exponent);
  a->set_head_floor(c.allocator.head_floor);
  a->set_clip_low(c.allocator.clip_low);
  a->set_clip_high(c.allocator.clip_high);
  a->set_profile(c.allocator.profile);
}

absl::StatusOr<RawTensor> RawTensorFromProto(const v1::Tensor& t, bool present,
                                             absl::string_view field) {
  RawTensor out;
  out.present = present;
  if (!present) return out;
  auto dtype = DTypeFromProto(t.dtype(), absl::StrCat(field, ".dtype"));
  if (!dtype.ok()) return dtype.status();
  out.dtype = *dtype;
  out.shape.assign(t.shape().begin(), t.shape().end());
  out.data = t.data();
  return out;
}

void DecisionToProto(const Decision& d, int64_t n_max, bool with_mask, v1::Decision* out) {
  out->set_num_layers(d.num_layers);
  out->set_num_kv_heads(d.num_kv_heads);
  out->mutable_budgets()->Assign(d.budgets.begin(), d.budgets.end());
  out->mutable_kept_lengths()->Assign(d.kept_lengths.begin(), d.kept_lengths.end());
  out->mutable_kept_indices()->Assign(d.kept_indices.begin(), d.kept_indices.end());
  out->set_evicted_tokens(d.evicted_tokens);
  out->set_words_per_head(WordsPerHead(n_max));
  if (with_mask) {
    const std::vector<uint64_t> mask = BuildKeepMask(d, n_max);
    // Words go out little-endian; this code base only targets little-endian hosts.
    static_assert(std::endian::native == std::endian::little);
    out->mutable_keep_mask()->assign(reinterpret_cast<const char*>(mask.data()),
                                     mask.size() * sizeof(uint64_t));
  }
}

void TimingsToProto(const StageSeconds& s, v1::StageTimings* out) {
  out->set_score_seconds(s.score);
  out->set_allocate_seconds(s.allocate);
  out->set_select_seconds(s.select);
  out->set_compact_seconds(s.compact);
  out->set_total_seconds(s.total);
}

absl::StatusOr<MemoryKind> MemoryKindFromProto(v1::MemoryKind memory, absl::string_view field) {
  switch (memory) {
    case v1::MEMORY_KIND_UNSPECIFIED:
    case v1::MEMORY_KIND_INLINE:
      return MemoryKind::kInline;
    case v1::MEMORY_KIND_HOST_SHM:
      return MemoryKind::kHostShm;
    case v1::MEMORY_KIND_CUDA_IPC:
      return MemoryKind::kCudaIpc;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, " = ", static_cast<int>(memory), " is not a known MemoryKind"));
  }
}

v1::MemoryKind MemoryKindToProto(MemoryKind memory) {
  switch (memory) {
    case MemoryKind::kInline:
      return v1::MEMORY_KIND_INLINE;
    case MemoryKind::kHostShm:
      return v1::MEMORY_KIND_HOST_SHM;
    case MemoryKind::kCudaIpc:
      return v1::MEMORY_KIND_CUDA_IPC;
  }
  return v1::MEMORY_KIND_UNSPECIFIED;
}

std::string MemoryKindName(MemoryKind memory) {
  return v1::MemoryKind_Name(MemoryKindToProto(memory));
}

std::string SessionModeName(bool managed) {
  return v1::SessionMode_Name(managed ? v1::SESSION_MODE_MANAGED : v1::SESSION_MODE_ADVISORY);
}

CompressCall CompressCallFromProto(const v1::CompressRequest& request) {
  CompressCall call;
  call.session_id = request.session_id();
  call.step = request.step();
  call.cuda_event_handle = request.cuda_event_handle();
  call.omit_keep_mask = request.omit_keep_mask();
  if (request.has_inline_tensors()) {
    const v1::InlineTensors& in = request.inline_tensors();
    InlineTensorsIn& t = call.inline_tensors.emplace();
    // A tensor that cannot be converted stays present, its error kept for the plane to report
    // after the caller and the session are checked.
    auto convert = [](const v1::Tensor& tensor, bool present, absl::string_view field,
                      RawTensor* out, absl::Status* error) {
      auto raw = RawTensorFromProto(tensor, present, field);
      if (raw.ok()) {
        *out = *std::move(raw);
      } else {
        out->present = present;
        if (error->ok()) *error = raw.status();
      }
    };
    convert(in.query_window(), in.has_query_window(), "inline_tensors.query_window",
            &t.query_window, &t.decode_error);
    convert(in.keys(), in.has_keys(), "inline_tensors.keys", &t.keys, &t.decode_error);
    convert(in.values(), in.has_values(), "inline_tensors.values", &t.values, &t.decode_error);
    convert(in.attention(), in.has_attention(), "inline_tensors.attention", &t.attention,
            &t.attention_error);
    t.lengths =
        std::span<const int32_t>(in.lengths().data(), static_cast<size_t>(in.lengths().size()));
  }
  return call;
}

namespace {

void RowsToProto(CompactedRows& rows, v1::Tensor* out) {
  out->set_dtype(DTypeToProto(rows.dtype));
  for (int64_t dim : rows.shape) out->add_shape(dim);
  out->set_data(std::move(rows.bytes));
}

}  // namespace

InlineAnswerSink WireAnswerSink(const v1::CompressRequest& request, v1::CompressResponse* response,
                                uint64_t max_message_bytes, uint64_t* message_bytes) {
  return [&request, response, max_message_bytes,
          message_bytes](const InlineAnswerView& answer) -> absl::Status {
    response->set_session_id(request.session_id());
    response->set_step(request.step());
    DecisionToProto(answer.decision, answer.n_max, answer.keep_mask, response->mutable_decision());
    if (answer.keys != nullptr) RowsToProto(*answer.keys, response->mutable_compacted_keys());
    if (answer.values != nullptr) {
      RowsToProto(*answer.values, response->mutable_compacted_values());
    }
    // Room for the epoch and the timings, set once the event commits.
    constexpr size_t kEpochAndTimings = 16 + 64;
    const size_t bytes = response->ByteSizeLong() + kEpochAndTimings;
    if (bytes > max_message_bytes) {
      response->Clear();
      return absl::ResourceExhaustedError(
          absl::StrCat("the response would be ", bytes, " bytes, above max_message_bytes ",
                       max_message_bytes, "; set omit_keep_mask or send fewer tokens per request"));
    }
    if (message_bytes != nullptr) {
      // The item's framing inside CompressBatchResult (two tags and two lengths).
      constexpr uint64_t kFraming = 16;
      if (*message_bytes + bytes + kFraming > max_message_bytes) {
        response->Clear();
        return absl::ResourceExhaustedError(absl::StrCat(
            "this answer (", bytes, " bytes) would take the batch result past max_message_bytes ",
            max_message_bytes, " (", *message_bytes,
            " bytes taken by earlier answers); the event was not applied: send it again in another "
            "CompressBatch, or fewer requests per batch"));
      }
      *message_bytes += bytes + kFraming;
    }
    return absl::OkStatus();
  };
}

void StreamItemError(const absl::Status& status, v1::CompressResult* result) {
  // Room for the code, the framing and the cut's marker.
  constexpr size_t kMaxMessage = kStreamItemReserve - 64;
  result->clear_response();
  result->mutable_error()->set_code(static_cast<int>(status.code()));
  if (status.message().size() <= kMaxMessage) {
    result->mutable_error()->set_message(std::string(status.message()));
  } else {
    result->mutable_error()->set_message(
        absl::StrCat(status.message().substr(0, kMaxMessage), " [cut]"));
  }
}

void CompressOutcomeToProto(const CompressCall& call, const EventOutcome& outcome,
                            v1::CompressResponse* response) {
  response->set_session_id(call.session_id);
  response->set_step(call.step);
  response->set_epoch(outcome.committed.epoch);
  if (!call.inline_tensors.has_value()) {
    // An arena event: the decision itself is in the result arena, so the answer stays a few
    // dozen bytes.
    v1::Decision* d = response->mutable_decision();
    d->set_num_layers(outcome.decision.num_layers);
    d->set_num_kv_heads(outcome.decision.num_kv_heads);
    d->set_evicted_tokens(outcome.decision.evicted_tokens);
  }
  TimingsToProto(outcome.decision.seconds, response->mutable_timings());
}

v1::CompressEvent CompressEventToProto(const std::string& session_id, const std::string& model,
                                       int64_t step, uint64_t epoch, const Decision& decision,
                                       absl::Time now) {
  v1::CompressEvent e;
  e.set_session_id(session_id);
  e.set_model_name(model);
  e.set_step(step);
  e.set_epoch(epoch);
  int32_t lo = 0;
  int32_t hi = 0;
  for (int l = 0; l < decision.num_layers; ++l) {
    int32_t layer = 0;
    for (int h = 0; h < decision.num_kv_heads; ++h) {
      const int32_t b = decision.budgets[static_cast<size_t>(l * decision.num_kv_heads + h)];
      layer += b;
      lo = (l == 0 && h == 0) ? b : std::min(lo, b);
      hi = std::max(hi, b);
    }
    // Tokens per KV head, the mean over the layer's heads (rounded): the unit of --budget and
    // of GetSession's layer_budgets.
    e.add_layer_budgets(static_cast<int32_t>(
        std::lround(static_cast<double>(layer) / std::max(decision.num_kv_heads, 1))));
  }
  e.set_head_budget_spread(lo > 0 ? static_cast<double>(hi) / lo : 0.0);
  e.set_evicted_tokens(decision.evicted_tokens);
  TimingsToProto(decision.seconds, e.mutable_timings());
  e.set_unix_ms(absl::ToUnixMillis(now));
  return e;
}

}  // namespace reasonalloc
