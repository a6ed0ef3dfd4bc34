#include "server/event_hub.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace reasonalloc {

bool EventHub::Watcher::Wants(const v1::CompressEvent& e) const {
  if (!sessions_.empty() && sessions_.count(e.session_id()) == 0) return false;
  return model_.empty() || model_ == e.model_name();
}

bool EventHub::Watcher::Push(const v1::CompressEvent& e) {
  MutexLock lock(&mu_);
  if (closed_) return true;
  if (queue_.size() >= capacity_) {
    ++dropped_;
    return false;
  }
  queue_.push_back(e);
  return true;
}

bool EventHub::Watcher::Next(absl::Time deadline, v1::CompressEvent* event,
                             uint64_t* dropped_before) {
  MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return closed_ || !queue_.empty(); };
  mu_.AwaitWithDeadline(ready, deadline);
  if (closed_ || queue_.empty()) return false;
  *event = std::move(queue_.front());
  queue_.pop_front();
  *dropped_before = dropped_;
  dropped_ = 0;
  return true;
}

bool EventHub::Watcher::closed() const {
  MutexLock lock(&mu_);
  return closed_;
}

void EventHub::Watcher::Close() {
  MutexLock lock(&mu_);
  closed_ = true;
}

EventHub::EventHub(int max_watchers, size_t queue_capacity, std::function<void(int64_t)> on_drop)
    : max_watchers_(max_watchers), queue_capacity_(queue_capacity), on_drop_(std::move(on_drop)) {}

absl::StatusOr<std::shared_ptr<EventHub::Watcher>> EventHub::Subscribe(
    std::set<std::string> sessions, std::string model) {
  MutexLock lock(&mu_);
  if (closed_) return absl::UnavailableError("the server is draining");
  if (static_cast<int>(watchers_.size()) >= max_watchers_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("already ", watchers_.size(),
                     " WatchMetrics streams, the server's limit (--max-watchers)"));
  }
  auto w = std::make_shared<Watcher>(std::move(sessions), std::move(model), queue_capacity_);
  watchers_.push_back(w);
  return w;
}

void EventHub::Unsubscribe(const std::shared_ptr<Watcher>& w) {
  MutexLock lock(&mu_);
  watchers_.erase(std::remove(watchers_.begin(), watchers_.end(), w), watchers_.end());
}

void EventHub::Publish(const v1::CompressEvent& e) {
  std::vector<std::shared_ptr<Watcher>> targets;
  {
    MutexLock lock(&mu_);
    for (const auto& w : watchers_) {
      if (w->Wants(e)) targets.push_back(w);
    }
  }
  int64_t dropped = 0;
  for (const auto& w : targets) {
    if (!w->Push(e)) ++dropped;
  }
  if (dropped > 0 && on_drop_) on_drop_(dropped);
}

void EventHub::Close() {
  MutexLock lock(&mu_);
  closed_ = true;
  for (const auto& w : watchers_) w->Close();
}

int EventHub::watchers() const {
  MutexLock lock(&mu_);
  return static_cast<int>(watchers_.size());
}

}  // namespace reasonalloc
