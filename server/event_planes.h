// The three memory kinds of a session as EventPlanes (server/event_transaction.h): what each
// reads, checks, applies and publishes for one CompressRequest.
#ifndef REASONALLOC_SERVER_EVENT_PLANES_H_
#define REASONALLOC_SERVER_EVENT_PLANES_H_

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/time/time.h"
#include "core/inline_inputs.h"
#include "reasonalloc/v1/sidecar.pb.h"
#include "server/cuda_session_arenas.h"
#include "server/event_transaction.h"
#include "server/session_arenas.h"

namespace reasonalloc {

// What every plane needs from the server.
struct PlaneLimits {
  uint64_t max_event_bytes = 0;    // 0 = no limit
  uint64_t max_message_bytes = 0;  // the answer (inline: it carries the compacted rows)
  absl::Duration testing_delay = absl::ZeroDuration();  // slept after reading (tests only)
  std::function<bool()> cancelled;                      // the call was cancelled
  std::function<void(int events)> on_device_batch;      // after each CUDA launch set
};

// MEMORY_KIND_INLINE: the tensors come in the request; managed sessions get their compacted rows
// back in the response. Calibrating sessions keep everything and measure.
class InlinePlane : public EventPlane {
 public:
  InlinePlane(const v1::CompressRequest& request, v1::CompressResponse* response,
              PlaneLimits limits)
      : request_(request), response_(response), limits_(std::move(limits)) {}
  absl::StatusOr<PlannedEvent> Decide(Session& session, int64_t step) override;
  absl::Status CheckFits(const PlannedEvent& event) override;
  absl::Status Apply(PlannedEvent& event) override;
  absl::Status Publish(const PlannedEvent& event, uint64_t epoch) override;

 private:
  const v1::CompressRequest& request_;
  v1::CompressResponse* response_;
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
  HostShmPlane(const v1::CompressRequest& request, SessionArenas& arenas, PlaneLimits limits)
      : request_(request), arenas_(arenas), limits_(std::move(limits)) {}
  absl::StatusOr<PlannedEvent> Decide(Session& session, int64_t step) override;
  absl::Status CheckFits(const PlannedEvent& event) override;
  absl::Status Apply(PlannedEvent& event) override;
  absl::Status Publish(const PlannedEvent& event, uint64_t epoch) override;

 private:
  const v1::CompressRequest& request_;
  SessionArenas& arenas_;
  PlaneLimits limits_;
};

// MEMORY_KIND_CUDA_IPC: the whole event on the GPU (scoring, allocation, selection, compaction).
// Sessions sharing an engine batch: their events of one message run as one CompressBatch.
class CudaPlane : public EventPlane {
 public:
  CudaPlane(const v1::CompressRequest& request, CudaSessionArenas& arenas, PlaneLimits limits)
      : request_(request), arenas_(arenas), limits_(std::move(limits)) {}
  absl::StatusOr<PlannedEvent> Decide(Session& session, int64_t step) override;
  absl::Status CheckFits(const PlannedEvent& event) override;
  absl::Status Apply(PlannedEvent& event) override;
  absl::Status Publish(const PlannedEvent& event, uint64_t epoch) override;
  const void* batch_key() const override { return &arenas_.engine(); }
  absl::Status Prepare(Session& session, int64_t step) override;
  void DecideTogether(std::span<EventPlane* const> planes,
                      std::span<absl::StatusOr<PlannedEvent>> out) override;

 private:
  const v1::CompressRequest& request_;
  CudaSessionArenas& arenas_;
  PlaneLimits limits_;
  gpu::DeviceEventInputs prepared_;
};

// The answer of an arena event (host or CUDA): the decision itself is in the result arena, so the
// answer stays a few dozen bytes.
void AnswerArenaEvent(const Session& session, int64_t step, const EventOutcome& outcome,
                      v1::CompressResponse* response);

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_EVENT_PLANES_H_
