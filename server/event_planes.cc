#include "server/event_planes.h"

#include <chrono>
#include <cstddef>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/h2o.h"
#include "core/status_macros.h"

namespace reasonalloc {
namespace {

// The worker's accumulated attention of an inline h2o event, [L, Hkv, N] fp32; empty when not
// sent.
absl::StatusOr<std::vector<float>> H2oAttention(const RawTensor& raw, const SessionConfig& config,
                                                int64_t n_max) {
  constexpr absl::string_view kField = "inline_tensors.attention";
  if (!raw.present) return std::vector<float>();
  if (raw.dtype != DType::kFloat32) {
    return absl::InvalidArgumentError(absl::StrCat(kField, " must be DTYPE_FLOAT32"));
  }
  const std::vector<int64_t> want = {config.model.num_layers, config.model.num_kv_heads, n_max};
  if (raw.shape != want) {
    return absl::InvalidArgumentError(absl::StrCat(kField, " must have shape [", want[0], ", ",
                                                   want[1], ", ", want[2], "] (L, Hkv, N)"));
  }
  RETURN_IF_ERROR(CheckTensorBytes(kField, raw));
  std::vector<float> out(raw.data.size() / sizeof(float));
  std::memcpy(out.data(), raw.data.data(), raw.data.size());
  return out;
}

void SleepForTesting(const PlaneLimits& limits) {
  if (limits.testing_delay > absl::ZeroDuration()) absl::SleepFor(limits.testing_delay);
}

// h2o sessions: the accumulator's values for this event (committed with it), handed to the
// engine through inputs->accumulated.
absl::Status PrepareH2o(Session& session, const Engine& engine, const float* attention,
                        int64_t step, CompressInputs* inputs, PlannedEvent* event) {
  H2oAccumulator* h2o = session.h2o();
  if (h2o == nullptr) return absl::OkStatus();
  RETURN_IF_ERROR(engine.CheckInputs(*inputs));
  ASSIGN_OR_RETURN(event->accumulated, h2o->Prepare(*inputs, attention, step));
  event->commit_h2o = true;
  inputs->accumulated = event->accumulated.data();
  return absl::OkStatus();
}

}  // namespace

// ---- MEMORY_KIND_INLINE ----

absl::StatusOr<PlannedEvent> InlinePlane::Decide(Session& session, int64_t step) {
  if (!call_.inline_tensors.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("inline_tensors is required: the session's memory is ",
                     MemoryKindName(MemoryKind::kInline)));
  }
  if (!call_.cuda_event_handle.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda_event_handle must be empty for a ", MemoryKindName(MemoryKind::kInline), " session"));
  }
  engine_ = session.engine();  // held: UpdateBudget may replace the session's engine
  const Engine* engine = engine_.get();
  const SessionConfig& config = engine_->config();
  const InlineTensorsIn& in = *call_.inline_tensors;
  RETURN_IF_ERROR(in.decode_error);
  keys_ = in.keys;
  values_ = in.values;
  ASSIGN_OR_RETURN(prepared_,
                   PrepareInlineInputs(config, in.query_window, keys_, values_, in.lengths));
  const PreparedInputs* prepared = &prepared_;
  SleepForTesting(limits_);

  CompressInputs inputs = prepared->view();
  inputs.cancelled = call_.cancelled;
  inputs.max_event_bytes = limits_.max_event_bytes;
  PlannedEvent event;
  event.n_max = prepared->n_max;
  if (session.h2o() != nullptr) {
    RETURN_IF_ERROR(in.attention_error);
    ASSIGN_OR_RETURN(const std::vector<float> attention,
                     H2oAttention(in.attention, config, prepared->n_max));
    RETURN_IF_ERROR(PrepareH2o(session, *engine, attention.empty() ? nullptr : attention.data(),
                               step, &inputs, &event));
  } else if (in.attention.present) {
    return absl::InvalidArgumentError(absl::StrCat(
        "inline_tensors.attention is only for h2o sessions; this session's scorer is \"",
        NameOf(config.scorer.kind), "\""));
  }
  if (session.calibrating()) {
    // Full cache while calibrating: evict nothing; the measurement is taken in Apply, the last
    // stage that may fail, so a refused event records no sample and a retried step only one.
    RETURN_IF_ERROR(engine->CheckInputs(inputs));
    calibrating_session_ = &session;
    step_ = step;
    event.decision = KeepAll(config.model.num_layers, config.model.num_kv_heads, prepared->lengths);
    return event;
  }
  ASSIGN_OR_RETURN(event.decision, engine->Compress(inputs));
  return event;
}

absl::Status InlinePlane::CheckFits(const PlannedEvent&) { return absl::OkStatus(); }

absl::Status InlinePlane::Apply(PlannedEvent& event) {
  Decision& decision = event.decision;
  const SessionConfig& config = engine_->config();
  std::optional<CompactedRows> keys, values;
  if (config.managed && call_.answer) {
    // The sidecar holds K and V: hand back each head's kept rows, compacted, in their own dtype.
    const int64_t max_kept = decision.max_kept();
    const int d = config.model.head_dim;
    for (auto [src, dst] : {std::pair{&keys_, &keys}, std::pair{&values_, &values}}) {
      const size_t row_bytes = DTypeSize(src->dtype) * static_cast<size_t>(d);
      CompactedRows& rows = dst->emplace();
      rows.dtype = src->dtype;
      rows.shape = {config.model.num_layers, config.model.num_kv_heads, max_kept, d};
      rows.bytes.resize(static_cast<size_t>(config.model.num_heads_total() * max_kept) * row_bytes);
      GatherKeptRows(decision, src->data.data(), event.n_max, row_bytes, max_kept,
                     rows.bytes.data());
    }
  }
  // The answer is handed over before the commit: one that cannot be delivered must not advance
  // the session (the worker retries the same step).
  if (call_.answer) {
    const InlineAnswerView answer{decision, event.n_max, !call_.omit_keep_mask,
                                  keys.has_value() ? &*keys : nullptr,
                                  values.has_value() ? &*values : nullptr};
    RETURN_IF_ERROR(call_.answer(answer));
  }
  if (calibrating_session_ != nullptr) {
    const auto tc = std::chrono::steady_clock::now();
    CompressInputs inputs = prepared_.view();
    inputs.cancelled = call_.cancelled;
    inputs.max_event_bytes = limits_.max_event_bytes;
    RETURN_IF_ERROR(calibrating_session_->ObserveCalibration(step_, inputs));
    event.decision.seconds.score +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - tc).count();
  }
  return absl::OkStatus();
}

absl::Status InlinePlane::Publish(const PlannedEvent&, uint64_t) { return absl::OkStatus(); }

// ---- MEMORY_KIND_HOST_SHM ----

absl::StatusOr<PlannedEvent> HostShmPlane::Decide(Session& session, int64_t step) {
  if (call_.inline_tensors.has_value()) {
    return absl::FailedPreconditionError(
        absl::StrCat("inline_tensors must be empty for a ", MemoryKindName(MemoryKind::kHostShm),
                     " session: the worker writes keys, values, queries and lengths into the "
                     "session's arenas"));
  }
  if (!call_.cuda_event_handle.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("cuda_event_handle must be empty for a ",
                                                      MemoryKindName(MemoryKind::kHostShm),
                                                      " session"));
  }
  const auto engine = session.engine();
  ASSIGN_OR_RETURN(ArenaInputs arena_inputs, arenas_.Read(step, limits_.max_event_bytes));
  const ArenaInputs* in = &arena_inputs;
  SleepForTesting(limits_);
  CompressInputs inputs = in->view();
  inputs.cancelled = call_.cancelled;
  inputs.max_event_bytes = limits_.max_event_bytes;
  inputs.fields = arenas_.advisory()
                      ? InputFields{"the registered keys", "the registered queries",
                                    "result arena \"len\"", "h2o_acc arena \"attention\""}
                      : kArenaFields;
  PlannedEvent event;
  event.n_max = in->n_max;
  RETURN_IF_ERROR(PrepareH2o(session, *engine,
                             in->attention.empty() ? nullptr : in->attention.data(), step, &inputs,
                             &event));
  ASSIGN_OR_RETURN(event.decision, engine->Compress(inputs));
  return event;
}

absl::Status HostShmPlane::CheckFits(const PlannedEvent& event) {
  return arenas_.CheckFits(event.decision);
}

absl::Status HostShmPlane::Apply(PlannedEvent& event) { return arenas_.Compact(event.decision); }

absl::Status HostShmPlane::Publish(const PlannedEvent& event, uint64_t epoch) {
  arenas_.Publish(event.decision, epoch);
  return absl::OkStatus();
}

// ---- MEMORY_KIND_CUDA_IPC ----

absl::Status CudaPlane::Prepare(Session&, int64_t step) {
  if (call_.inline_tensors.has_value()) {
    return absl::FailedPreconditionError(
        absl::StrCat("inline_tensors must be empty for a ", MemoryKindName(MemoryKind::kCudaIpc),
                     " session: the worker writes keys, values, queries and lengths into the "
                     "session's arenas"));
  }
  SleepForTesting(limits_);
  ASSIGN_OR_RETURN(prepared_, arenas_.Prepare(step, call_.cuda_event_handle));
  return absl::OkStatus();
}

void CudaPlane::DecideTogether(std::span<EventPlane* const> planes,
                               std::span<absl::StatusOr<PlannedEvent>> out) {
  // Every plane here shares this one's engine (its batch key), so each is a CudaPlane.
  gpu::GpuEngine& engine = arenas_.engine();
  std::vector<size_t> pending(planes.size());
  for (size_t i = 0; i < planes.size(); ++i) {
    REASONALLOC_DCHECK(planes[i]->batch_key() == batch_key());
    pending[i] = i;
  }
  // One launch set for the batch. An event at fault (NaN keys, logits overflowing) fails alone
  // and the rest run again together: at most one extra launch set per event at fault. An error
  // that names no event (a device fault) fails the batch's events, each retryable.
  while (!pending.empty()) {
    std::vector<gpu::DeviceEventInputs> inputs;
    for (size_t i : pending) inputs.push_back(static_cast<CudaPlane*>(planes[i])->prepared_);
    const std::vector<std::string> names(pending.size(), "arenas");
    auto decided = engine.CompressBatch(inputs, names);
    if (decided.ok()) {
      if (limits_.on_device_batch) limits_.on_device_batch(static_cast<int>(pending.size()));
      for (size_t k = 0; k < pending.size(); ++k) {
        PlannedEvent event;
        event.decision = std::move((*decided)[k]);
        out[pending[k]] = std::move(event);
      }
      return;
    }
    const std::optional<size_t> at = gpu::EventIndexOf(decided.status());
    if (!at.has_value() || *at >= pending.size()) {
      for (size_t i : pending) out[i] = decided.status();
      return;
    }
    absl::Status own = decided.status();
    own.ErasePayload(gpu::kEventIndexPayload);
    out[pending[*at]] = own;
    pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(*at));
  }
}

absl::StatusOr<PlannedEvent> CudaPlane::Decide(Session& session, int64_t step) {
  RETURN_IF_ERROR(Prepare(session, step));
  EventPlane* self = this;
  absl::StatusOr<PlannedEvent> out = absl::UnknownError("not decided");
  DecideTogether(std::span<EventPlane* const>(&self, 1),
                 std::span<absl::StatusOr<PlannedEvent>>(&out, 1));
  return out;
}

absl::Status CudaPlane::CheckFits(const PlannedEvent& event) {
  return arenas_.CheckFits(event.decision);
}

absl::Status CudaPlane::Apply(PlannedEvent& event) {
  // Compaction can fail (GPU memory for its scratch) and then leaves the session as it was.
  return arenas_.Compact(event.decision);
}

absl::Status CudaPlane::Publish(const PlannedEvent& event, uint64_t epoch) {
  if (auto s = arenas_.Publish(event.decision, epoch); !s.ok()) {
    // Only a device fault gets here: the rows moved but the result block could not be written.
    return absl::InternalError(
        absl::StrCat("writing the decision to the CUDA arenas failed: ", s.message()));
  }
  return absl::OkStatus();
}

}  // namespace reasonalloc
