// Mutex, scoped lock and notification for the project's own shared state.
//
// Why not absl::Mutex: Debian's Abseil is built without ThreadSanitizer annotations, so TSan
// cannot see absl::Mutex acquire or release and reports every access it guards as a race. These
// types sit on std::mutex and std::condition_variable (pthreads, which TSan intercepts) and carry
// the same clang thread-safety attributes, so `-Wthread-safety` checks ABSL_GUARDED_BY fields and
// TSan checks the accesses, in the same build.
//
// Mutex::Await* keep absl::Mutex's contract: the condition is evaluated with the lock held and
// re-evaluated whenever another thread releases the lock, so callers need no explicit signal. As in
// absl::Mutex, the releasing thread evaluates the waiters' conditions itself and wakes only a
// waiter whose condition has become true: a thread parked on a mutex (the registry's reaper, a
// health watcher) costs the threads that take that mutex a few predicate calls, not a wake-up
// and two context switches per unlock.
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
    // Signalled with the lock held: a woken waiter may destroy this Mutex (a Notification on its
    // stack) as soon as it can lock it, so nothing here may touch the mutex after unlock().
    SignalWaiters();
    mu_.unlock();
  }

  // Blocks (lock held on entry and on return) until cond() is true or `deadline` passes; returns
  // cond()'s last value.
  template <typename Cond>
  bool AwaitWithDeadline(Cond cond, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
    // The caller may have changed the state other waiters wait on: their conditions are checked
    // now, as an unlock would.
    SignalWaiters();
    Waiter self;
    self.cond = &cond;
    // Called by releasing threads, which hold the lock (SignalWaiters runs under mu_).
    self.eval = [](void* c) ABSL_NO_THREAD_SAFETY_ANALYSIS { return (*static_cast<Cond*>(c))(); };
    // Linked in front; unlinked before returning (the node lives on this stack).
    self.next = waiters_;
    waiters_ = &self;
    bool ok = cond();
    while (!ok && absl::Now() < deadline) {
      if (deadline == absl::InfiniteFuture()) {
        self.cv.wait(lock, [&self] { return self.signalled; });
      } else {
        self.cv.wait_until(lock, absl::ToChronoTime(deadline), [&self] { return self.signalled; });
      }
      self.signalled = false;
      ok = cond();
    }
    for (Waiter** w = &waiters_; *w != nullptr; w = &(*w)->next) {
      if (*w == &self) {
        *w = self.next;
        break;
      }
    }
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
  // One thread in Await*, on its own stack.
  struct Waiter {
    void* cond = nullptr;
    bool (*eval)(void*) = nullptr;
    std::condition_variable cv;
    bool signalled = false;  // its condition was seen true since it last looked
    Waiter* next = nullptr;
  };

  // With mu_ held: wakes each waiter whose condition is now true.
  void SignalWaiters() {
    for (Waiter* w = waiters_; w != nullptr; w = w->next) {
      if (!w->signalled && w->eval(w->cond)) {
        w->signalled = true;
        w->cv.notify_one();
      }
    }
  }

  std::mutex mu_;
  Waiter* waiters_ = nullptr;  // touched only with mu_ held
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
