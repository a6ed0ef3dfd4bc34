// Mutex, scoped lock and notification for the project's own shared state.
//
// Why not absl::Mutex: Debian's Abseil is built without ThreadSanitizer annotations, so TSan
// cannot see absl::Mutex acquire or release and reports every access it guards as a race. These
// types sit on std::mutex and std::condition_variable (pthreads, which TSan intercepts) and carry
// the same clang thread-safety attributes, so `-Wthread-safety` checks ABSL_GUARDED_BY fields and
// TSan checks the accesses, in the same build.
//
// Mutex::Await* keep absl::Mutex's contract: the condition is evaluated with the lock held and
// re-evaluated after every Unlock by another thread, so callers need no explicit signal.
#ifndef REASONALLOC_CORE_SYNC_H_
#define REASONALLOC_CORE_SYNC_H_

#include <condition_variable>
#include <mutex>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace reasonalloc {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() {
    // Notified with the lock held: a woken waiter may destroy this Mutex (a Notification on its
    // stack) as soon as it can lock it, so nothing here may touch the mutex after unlock().
    if (waiters_ > 0) cv_.notify_all();
    mu_.unlock();
  }

  // Blocks (lock held on entry and on return) until cond() is true or `deadline` passes; returns
  // cond()'s last value.
  template <typename Cond>
  bool AwaitWithDeadline(Cond cond, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
    // The caller may have changed the state other waiters wait on: they re-check it too.
    if (waiters_ > 0) cv_.notify_all();
    ++waiters_;
    bool ok = cond();
    while (!ok && absl::Now() < deadline) {
      if (deadline == absl::InfiniteFuture()) {
        cv_.wait(lock);
      } else {
        cv_.wait_until(lock, absl::ToChronoTime(deadline));
      }
      ok = cond();
    }
    --waiters_;
    lock.release();  // the caller's scoped lock still owns the mutex
    return ok;
  }
  template <typename Cond>
  bool AwaitWithTimeout(Cond cond, absl::Duration timeout) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    return AwaitWithDeadline(std::move(cond), absl::Now() + timeout);
  }
  template <typename Cond>
  void Await(Cond cond) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    AwaitWithDeadline(std::move(cond), absl::InfiniteFuture());
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int waiters_ = 0;  // touched only with mu_ held
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

// A one-shot event: Notify() once, any number of threads wait for it.
class Notification {
 public:
  void Notify() {
    MutexLock lock(&mu_);
    notified_ = true;
  }
  bool HasBeenNotified() {
    MutexLock lock(&mu_);
    return notified_;
  }
  void WaitForNotification() {
    MutexLock lock(&mu_);
    mu_.Await([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return notified_; });
  }
  bool WaitForNotificationWithDeadline(absl::Time deadline) {
    MutexLock lock(&mu_);
    return mu_.AwaitWithDeadline([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return notified_; },
                                 deadline);
  }
  bool WaitForNotificationWithTimeout(absl::Duration timeout) {
    return WaitForNotificationWithDeadline(absl::Now() + timeout);
  }

 private:
  Mutex mu_;
  bool notified_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_SYNC_H_
