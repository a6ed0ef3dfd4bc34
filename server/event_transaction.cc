#include "server/event_transaction.h"

#include <algorithm>
#include <optional>
#include <set>
#include <utility>

#include "core/h2o.h"
#include "core/status_macros.h"

namespace reasonalloc {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

absl::Status EventPlane::Prepare(Session&, int64_t) {
  return absl::UnimplementedError("this memory kind decides alone");
}

void EventPlane::DecideTogether(std::span<EventPlane* const>,
                                std::span<absl::StatusOr<PlannedEvent>> out) {
  for (auto& o : out) o = absl::UnimplementedError("this memory kind decides alone");
}

namespace {

// fits → apply → commit → publish → record, under the caller's guard.
absl::StatusOr<EventOutcome> FinishEvent(Session& session, int64_t step, EventPlane& plane,
                                         PlannedEvent event,
                                         std::chrono::steady_clock::time_point t0,
                                         const std::function<void(const EventOutcome&)>& record) {
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

// Jobs of distinct sessions.
void RunWave(std::span<EventJob> jobs) {
  auto start = [](EventJob& j) {
    if (j.t0 == std::chrono::steady_clock::time_point{}) j.t0 = std::chrono::steady_clock::now();
  };
  // Planes that decide alone run first, whole, in order: the batched sessions' guards are not
  // held meanwhile and their time does not include these events.
  for (EventJob& j : jobs) {
    if (j.plane->batch_key() != nullptr) continue;
    start(j);
    j.outcome = RunCompressEvent(*j.session, j.step, *j.plane, j.t0, j.record);
  }
  std::vector<std::optional<Session::CompressGuard>> guards(jobs.size());
  // Batch groups in the order their first job appears.
  std::vector<std::pair<const void*, std::vector<size_t>>> groups;
  for (size_t i = 0; i < jobs.size(); ++i) {
    EventJob& j = jobs[i];
    const void* key = j.plane->batch_key();
    if (key == nullptr) continue;
    start(j);
    auto guard = j.session->BeginCompress();
    if (!guard.ok()) {
      j.outcome = guard.status();
      continue;
    }
    guards[i].emplace(std::move(guard).value());
    if (absl::Status s = j.session->CheckStep(j.step); !s.ok()) {
      j.outcome = s;
      guards[i].reset();
      continue;
    }
    if (absl::Status s = j.plane->Prepare(*j.session, j.step); !s.ok()) {
      j.outcome = s;
      guards[i].reset();
      continue;
    }
    auto g =
        std::find_if(groups.begin(), groups.end(), [&](const auto& x) { return x.first == key; });
    if (g == groups.end()) {
      groups.push_back({key, {i}});
    } else {
      g->second.push_back(i);
    }
  }
  for (const auto& [key, members] : groups) {
    std::vector<EventPlane*> planes;
    for (size_t i : members) planes.push_back(jobs[i].plane);
    std::vector<absl::StatusOr<PlannedEvent>> planned(members.size(),
                                                      absl::UnknownError("not decided"));
    planes.front()->DecideTogether(planes, planned);
    for (size_t k = 0; k < members.size(); ++k) {
      EventJob& j = jobs[members[k]];
      if (planned[k].ok()) {
        j.outcome = FinishEvent(*j.session, j.step, *j.plane, std::move(planned[k]).value(), j.t0,
                                j.record);
      } else {
        j.outcome = planned[k].status();
      }
      guards[members[k]].reset();
    }
  }
}

}  // namespace

absl::StatusOr<EventOutcome> RunCompressEvent(
    Session& session, int64_t step, EventPlane& plane, std::chrono::steady_clock::time_point t0,
    const std::function<void(const EventOutcome&)>& record) {
  ASSIGN_OR_RETURN(const Session::CompressGuard guard, session.BeginCompress());
  RETURN_IF_ERROR(session.CheckStep(step));
  ASSIGN_OR_RETURN(PlannedEvent event, plane.Decide(session, step));
  return FinishEvent(session, step, plane, std::move(event), t0, record);
}

void RunCompressEvents(std::span<EventJob> jobs) {
  size_t begin = 0;
  while (begin < jobs.size()) {
    std::set<const Session*> wave;
    size_t end = begin;
    while (end < jobs.size() && wave.insert(jobs[end].session).second) ++end;
    RunWave(jobs.subspan(begin, end - begin));
    begin = end;
  }
}

}  // namespace reasonalloc
