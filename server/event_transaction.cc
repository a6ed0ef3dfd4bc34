#include "server/event_transaction.h"

#include <utility>

#include "core/h2o.h"

namespace reasonalloc {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

absl::StatusOr<EventOutcome> RunCompressEvent(Session& session, int64_t step, EventPlane& plane,
                                              std::chrono::steady_clock::time_point t0) {
  auto guard = session.BeginCompress();
  if (!guard.ok()) return guard.status();
  if (auto s = session.CheckStep(step); !s.ok()) return s;
  auto event = plane.Decide(session, step);
  if (!event.ok()) return event.status();
  if (auto s = plane.CheckFits(*event); !s.ok()) return s;
  const auto tc = std::chrono::steady_clock::now();
  if (auto s = plane.Apply(*event); !s.ok()) return s;
  event->decision.seconds.compact += SecondsSince(tc);
  if (H2oAccumulator* h2o = session.h2o(); h2o != nullptr && event->commit_h2o) {
    h2o->Commit(event->decision, event->accumulated, event->n_max, step);
  }
  EventOutcome out;
  out.committed = session.Commit(step, event->decision);
  event->decision.seconds.total = SecondsSince(t0);
  if (auto s = plane.Publish(*event, out.committed.epoch); !s.ok()) return s;
  out.decision = std::move(event->decision);
  return out;
}

}  // namespace reasonalloc
