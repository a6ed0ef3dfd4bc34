// The three memory kinds of a session as EventPlanes (server/event_transaction.h): what each
// reads, checks, applies and publishes for one compression call. Calls and answers are domain
// types (CompressCall, InlineAnswerView); the gRPC adapter converts messages into them
// (server/proto_convert.h).
#ifndef REASONALLOC_SERVER_EVENT_PLANES_H_
#define REASONALLOC_SERVER_EVENT_PLANES_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "core/dtype.h"
#include "core/inline_inputs.h"
#include "core/policy.h"
#include "server/cuda_session_arenas.h"
#include "server/event_transaction.h"
#include "server/session_arenas.h"

namespace reasonalloc {

// Where a session's KV cache lives: one plane each.
enum class MemoryKind { kInline, kHostShm, kCudaIpc };
inline constexpr MemoryKind kMemoryKinds[] = {MemoryKind::kInline, MemoryKind::kHostShm,
                                              MemoryKind::kCudaIpc};
// The memory kind's bit in a policy's plane sets (core/policy.h).
constexpr uint32_t PlaneBit(MemoryKind m) {
  return m == MemoryKind::kInline    ? kInlinePlane
         : m == MemoryKind::kHostShm ? kHostShmPlane
                                     : kCudaIpcPlane;
}
// The wire spelling ("MEMORY_KIND_HOST_SHM"), from the proto descriptor (server/proto_convert.cc).
std::string MemoryKindName(MemoryKind memory);

// An inline event's tensors as they arrived (not owned; each names its wire field in errors).
struct InlineTensorsIn {
  RawTensor query_window, keys, values;
  RawTensor attention;               // h2o sessions only, optional
  std::span<const int32_t> lengths;  // empty = N everywhere
  // What the adapter could not convert (a dtype outside the API), naming the field: reported by
  // the plane after the caller, the session, the step and the memory kind are checked, as the
  // tensors' own checks are. `attention_error` only for h2o sessions (others refuse attention).
  absl::Status decode_error;
  absl::Status attention_error;
};

// A managed inline session's kept rows of K or V, gathered to each head's start:
// [L, Hkv, max kept, d] in the session's dtype; rows past a head's kept length are zero.
struct CompactedRows {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::string bytes;
};

// An inline event's answer, handed to CompressCall::answer after the decision and before the
// commit: the sink stages what it keeps (it may move the rows out) and refuses an answer it cannot
// deliver (the gRPC adapter: one above max_message_bytes), in which case nothing is committed and
// the same step may be retried. A staged answer is the event's only once the call returns OK: a
// later stage may still refuse the event (a calibrating session's measurement), so a sink never
// delivers before the outcome. The epoch and the stage timings come with the outcome.
struct InlineAnswerView {
  const Decision& decision;
  int64_t n_max;        // positions before the event (the keep mask's width)
  bool keep_mask;       // the caller wants the keep bitmask
  CompactedRows* keys;  // managed sessions; null for advisory ones
  CompactedRows* values;
};
using InlineAnswerSink = std::function<absl::Status(const InlineAnswerView&)>;

// One compression event as a caller asks for it.
struct CompressCall {
  std::string session_id;
  int64_t step = 0;
  // MEMORY_KIND_INLINE sessions: the tensors (required there, refused elsewhere).
  std::optional<InlineTensorsIn> inline_tensors;
  // MEMORY_KIND_CUDA_IPC sessions: a cudaIpcEventHandle_t to wait on before reading (bytes).
  std::string cuda_event_handle;
  bool omit_keep_mask = false;
  // The caller went away (polled between heads).
  std::function<bool()> cancelled;
  // Inline sessions: where the answer goes. Unset = discarded.
  InlineAnswerSink answer;
};

// What every plane needs from the server.
struct PlaneLimits {
  uint64_t max_event_bytes = 0;                         // 0 = no limit
  absl::Duration testing_delay = absl::ZeroDuration();  // slept after reading (tests only)
  std::function<void(int events)> on_device_batch;      // after each CUDA launch set
};

// MEMORY_KIND_INLINE: the tensors come with the call; managed sessions get their compacted rows
// back in the answer. Calibrating sessions keep everything and measure.
class InlinePlane : public EventPlane {
 public:
  InlinePlane(const CompressCall& call, PlaneLimits limits)
      : call_(call), limits_(std::move(limits)) {}
  absl::StatusOr<PlannedEvent> Decide(Session& session, int64_t step) override;
  absl::Status CheckFits(const PlannedEvent& event) override;
  absl::Status Apply(PlannedEvent& event) override;
  absl::Status Publish(const PlannedEvent& event, uint64_t epoch) override;

 private:
  const CompressCall& call_;
  PlaneLimits limits_;
  std::shared_ptr<const Engine> engine_;  // the session's, as of Decide
  RawTensor keys_, values_;
  PreparedInputs prepared_;
  Session* calibrating_session_ = nullptr;  // set by Decide: measure in Apply
  int64_t step_ = 0;
};

// MEMORY_KIND_HOST_SHM: keys, queries and lengths in the session's shared-memory arenas (or, for
// advisory sessions, the worker's registered buffers); compaction in place, the decision in the
// result arena.
class HostShmPlane : public EventPlane {
 public:
  HostShmPlane(const CompressCall& call, SessionArenas& arenas, PlaneLimits limits)
      : call_(call), arenas_(arenas), limits_(std::move(limits)) {}
  absl::StatusOr<PlannedEvent> Decide(Session& session, int64_t step) override;
  absl::Status CheckFits(const PlannedEvent& event) override;
  absl::Status Apply(PlannedEvent& event) override;
  absl::Status Publish(const PlannedEvent& event, uint64_t epoch) override;

 private:
  const CompressCall& call_;
  SessionArenas& arenas_;
  PlaneLimits limits_;
};

// MEMORY_KIND_CUDA_IPC: the whole event on the GPU (scoring, allocation, selection, compaction).
// Sessions sharing an engine batch: their events of one message run as one CompressBatch.
class CudaPlane : public EventPlane {
 public:
  CudaPlane(const CompressCall& call, CudaSessionArenas& arenas, PlaneLimits limits)
      : call_(call), arenas_(arenas), limits_(std::move(limits)) {}
  absl::StatusOr<PlannedEvent> Decide(Session& session, int64_t step) override;
  absl::Status CheckFits(const PlannedEvent& event) override;
  absl::Status Apply(PlannedEvent& event) override;
  absl::Status Publish(const PlannedEvent& event, uint64_t epoch) override;
  const void* batch_key() const override { return &arenas_.engine(); }
  absl::Status Prepare(Session& session, int64_t step) override;
  void DecideTogether(std::span<EventPlane* const> planes,
                      std::span<absl::StatusOr<PlannedEvent>> out) override;

 private:
  const CompressCall& call_;
  CudaSessionArenas& arenas_;
  PlaneLimits limits_;
  gpu::DeviceEventInputs prepared_;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_EVENT_PLANES_H_
