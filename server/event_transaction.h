// One compression event, whatever memory the session's KV cache lives in.
//
// A session's memory kind is an EventPlane: inline tensors in the request (InlinePlane), host
// shared-memory arenas (HostShmPlane), CUDA IPC arenas (CudaPlane). Each knows how to read an
// event's inputs and decide, whether a decision fits its memory, how to apply it and how to
// publish the new epoch where the worker looks. RunCompressEvent owns the order for all of them:
//
//   guard → step → decide (read + engine) → fits → apply → commit → publish
//
// Nothing the session or the worker can observe changes before apply (a calibrating session's
// measurement is taken in apply, after every check), and apply either succeeds or leaves the
// session's memory as it was; so any failure up to and including apply leaves the session
// uncommitted (same step, same epoch, no calibration sample) and the caller may retry the step.
#ifndef REASONALLOC_SERVER_EVENT_TRANSACTION_H_
#define REASONALLOC_SERVER_EVENT_TRANSACTION_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"
#include "server/session_registry.h"

namespace reasonalloc {

// A decided event, not yet applied.
struct PlannedEvent {
  Decision decision;
  // h2o sessions: the accumulator's new values (committed with the event) and the event's N.
  std::vector<float> accumulated;
  bool commit_h2o = false;
  int64_t n_max = 0;
};

class EventPlane {
 public:
  virtual ~EventPlane() = default;
  // Checks the request against the memory kind, reads the event's inputs and decides. Changes
  // nothing the session or the worker can observe.
  virtual absl::StatusOr<PlannedEvent> Decide(Session& session, int64_t step) = 0;
  // Whether the decision can be applied (the arenas' regions, the answer's size). Changes nothing.
  virtual absl::Status CheckFits(const PlannedEvent& event) = 0;
  // Applies the decision to the memory (compaction). On error the memory is as it was.
  virtual absl::Status Apply(PlannedEvent& event) = 0;
  // After the commit: makes the new epoch visible to the worker (result block, answer). A failure
  // here is a device fault (the event is committed, the worker learns of it by the error).
  virtual absl::Status Publish(const PlannedEvent& event, uint64_t epoch) = 0;
};

struct EventOutcome {
  Decision decision;  // with its stage timings (compact and total set here)
  Session::CommitResult committed;
};

// Runs one event on `session` through `plane` in the order above. `t0` starts the event's total
// time (the service passes the time the call arrived). `record`, when given, runs after publish
// while the session's compress guard is still held, so events are recorded (metrics,
// WatchMetrics) in the order they were committed.
absl::StatusOr<EventOutcome> RunCompressEvent(
    Session& session, int64_t step, EventPlane& plane, std::chrono::steady_clock::time_point t0,
    const std::function<void(const EventOutcome&)>& record = nullptr);

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_EVENT_TRANSACTION_H_
