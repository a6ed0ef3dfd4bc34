#include "server/event_transaction.h"

#include <utility>

#include "core/h2o.h"
#include "core/status_macros.h"

namespace reasonalloc {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

absl::StatusOr<EventOutcome> RunCompressEvent(
    Session& session, int64_t step, EventPlane& plane, std::chrono::steady_clock::time_point t0,
    const std::function<void(const EventOutcome&)>& record) {
  ASSIGN_OR_RETURN(const Session::CompressGuard guard, session.BeginCompress());
  RETURN_IF_ERROR(session.CheckStep(step));
  ASSIGN_OR_RETURN(PlannedEvent event, plane.Decide(session, step));
  RETURN_IF_ERROR(plane.CheckFits(event));
  const auto tc = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(plane.Apply(event));
  event.decision.seconds.compact += SecondsSince(tc);
  if (H2oAccumulator* h2o = session.h2o(); h2o != nullptr && event.commit_h2o) {
    h2o->Commit(event.decision, event.accumulated, event.n_max, step);
  }
  EventOutcome out;
  out.committed = session.Commit(step, event.decision);
  event.decision.seconds.total = SecondsSince(t0);
  RETURN_IF_ERROR(plane.Publish(event, out.committed.epoch));
  out.decision = std::move(event.decision);
  if (record) record(out);
  return out;
}

}  // namespace reasonalloc
