// One compression event, whatever memory the session's KV cache lives in.
//
// A session's memory kind is an EventPlane: inline tensors in the request (InlinePlane), host
// shared-memory arenas (HostShmPlane), CUDA IPC arenas (CudaPlane). Each knows how to read an
// event's inputs and decide, whether a decision fits its memory, how to apply it and how to
// publish the new epoch where the worker looks. RunCompressEvent owns the order for all of them:
//
//   guard → step → decide (read + engine) → fits → apply → commit → publish
//
// Sessions whose planes share a batch key (CUDA sessions of one engine, server/gpu_engine_pool.h)
// can decide together: RunCompressEvents takes a message's events, runs "decide" once for each
// group of them (one launch set on the GPU) and every other step per event, in the same order.
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
#include <span>
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

  // Deciding together. A plane that can decide with others returns a key that exactly the planes
  // it can batch with share (they are then of its type); null, the default, decides alone.
  virtual const void* batch_key() const { return nullptr; }
  // Batched planes: Decide's first half, the event's inputs read and checked alone.
  virtual absl::Status Prepare(Session& session, int64_t step);
  // Batched planes: decides the prepared events of `planes` (all with this plane's batch key, this
  // one among them) together; out[i] is planes[i]'s decision or its own error. One event's bad
  // input or fault never fails another's.
  virtual void DecideTogether(std::span<EventPlane* const> planes,
                              std::span<absl::StatusOr<PlannedEvent>> out);
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

// One event of a message (CompressStream).
struct EventJob {
  Session* session = nullptr;
  int64_t step = 0;
  EventPlane* plane = nullptr;
  // When the event's time starts; unset (the epoch) = when the run reaches it.
  std::chrono::steady_clock::time_point t0;
  std::function<void(const EventOutcome&)> record;
  absl::StatusOr<EventOutcome> outcome = NotRun();  // set by the run
  static absl::Status NotRun() { return absl::UnknownError("not run"); }
};
// Whether a job's outcome is still the one it started with (the run never reached it).
inline bool IsNotRun(const absl::StatusOr<EventOutcome>& outcome) {
  return !outcome.ok() && outcome.status() == EventJob::NotRun();
}

// Runs every job, each with RunCompressEvent's order and guarantees, except that jobs whose planes
// share a batch key decide together (guard, step and Prepare per job; one DecideTogether per
// group; then fits, apply, commit, publish and record per job, in the jobs' order). A session's
// later job runs after its earlier one has finished (the message is cut into waves at the first
// repeated session), so two events of one session keep their order.
void RunCompressEvents(std::span<EventJob> jobs);

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_EVENT_TRANSACTION_H_
