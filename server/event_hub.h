// Fan-out of per-event records to WatchMetrics streams. Publishing never blocks on a watcher: each
// watcher has a bounded queue, and an event that finds it full is dropped for that watcher and
// counted (MetricsEvent.dropped_before and reasonalloc_watch_events_dropped_total).
#ifndef REASONALLOC_SERVER_EVENT_HUB_H_
#define REASONALLOC_SERVER_EVENT_HUB_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/sync.h"
#include "reasonalloc/v1/sidecar.pb.h"

namespace reasonalloc {

class EventHub {
 public:
  class Watcher {
   public:
    Watcher(std::set<std::string> sessions, std::string model, size_t capacity)
        : sessions_(std::move(sessions)), model_(std::move(model)), capacity_(capacity) {}
    bool Wants(const v1::CompressEvent& e) const;
    // Waits until an event is queued, the hub closes or `deadline` passes. Returns true with an
    // event (and the count dropped before it); false on timeout or close (see closed()).
    bool Next(absl::Time deadline, v1::CompressEvent* event, uint64_t* dropped_before);
    bool closed() const;

   private:
    friend class EventHub;
    // Returns false when the queue was full and the event dropped.
    bool Push(const v1::CompressEvent& e);
    void Close();

    const std::set<std::string> sessions_;
    const std::string model_;
    const size_t capacity_;
    mutable Mutex mu_;
    std::deque<v1::CompressEvent> queue_ ABSL_GUARDED_BY(mu_);
    uint64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
    bool closed_ ABSL_GUARDED_BY(mu_) = false;
  };

  // `on_drop` is called (outside any hub lock) with the number of events dropped by one publish.
  EventHub(int max_watchers, size_t queue_capacity, std::function<void(int64_t)> on_drop);

  // RESOURCE_EXHAUSTED beyond max_watchers; UNAVAILABLE once closed.
  absl::StatusOr<std::shared_ptr<Watcher>> Subscribe(std::set<std::string> sessions,
                                                     std::string model);
  void Unsubscribe(const std::shared_ptr<Watcher>& w);
  void Publish(const v1::CompressEvent& e);
  // Ends every watch (drain) and refuses new ones.
  void Close();
  int watchers() const;
  // Whether anyone listens: callers skip building events when no one does.
  bool active() const { return watchers() > 0; }

 private:
  const int max_watchers_;
  const size_t queue_capacity_;
  const std::function<void(int64_t)> on_drop_;
  mutable Mutex mu_;
  std::vector<std::shared_ptr<Watcher>> watchers_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_EVENT_HUB_H_
