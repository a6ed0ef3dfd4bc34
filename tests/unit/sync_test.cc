// core/sync.h: Await's contract (the condition re-checked whenever another thread releases the
// lock, with no explicit signal) and its cost: a thread parked on a mutex is woken only when its
// condition has become true, not by every unlock (the registry's reaper waits on the registry's
// mutex, which every call takes).
#include "core/sync.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace reasonalloc {
namespace {

TEST(Mutex, AwaitWakesWhenItsConditionBecomesTrueAndNotOnOtherUnlocks) {
  Mutex mu;
  int value = 0;
  bool done = false;
  std::atomic<int> checks_by_waiter{0};
  std::atomic<bool> waiting{false};
  std::thread waiter([&] {
    const std::thread::id me = std::this_thread::get_id();
    MutexLock lock(&mu);
    waiting = true;
    mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      if (std::this_thread::get_id() == me) ++checks_by_waiter;
      return value >= 3;
    });
    done = true;
  });
  while (!waiting) std::this_thread::yield();
  // Many unlocks that leave the condition false: the waiter's thread does not run for them.
  for (int i = 0; i < 2000; ++i) {
    MutexLock lock(&mu);
    value = i % 2;
  }
  EXPECT_LE(checks_by_waiter.load(), 2);
  {
    MutexLock lock(&mu);
    value = 3;  // true at this unlock: the waiter wakes
  }
  waiter.join();
  MutexLock lock(&mu);
  EXPECT_TRUE(done);
}

TEST(Mutex, AwaitWithDeadlineTimesOutAndSeesAStateChangedBeforeItWaited) {
  Mutex mu;
  bool flag = false;
  MutexLock lock(&mu);
  const absl::Time t0 = absl::Now();
  EXPECT_FALSE(mu.AwaitWithTimeout([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return flag; },
                                   absl::Milliseconds(50)));
  EXPECT_GE(absl::Now() - t0, absl::Milliseconds(50));
  flag = true;
  EXPECT_TRUE(mu.AwaitWithTimeout([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return flag; },
                                  absl::Seconds(10)));
}

TEST(Mutex, EveryWaiterWhoseConditionHoldsWakes) {
  Mutex mu;
  int stage = 0;
  int waiting = 0;
  std::atomic<int> woken{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      MutexLock lock(&mu);
      ++waiting;
      mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return stage > t % 2; });
      ++woken;
    });
  }
  // Once the count reaches 4 under the lock, all four are parked inside Await.
  for (bool all = false; !all;) {
    MutexLock lock(&mu);
    all = waiting == 4;
  }
  {
    MutexLock lock(&mu);
    stage = 1;  // wakes the two waiting for stage > 0
  }
  while (woken.load() < 2) std::this_thread::yield();
  EXPECT_EQ(woken.load(), 2);
  {
    MutexLock lock(&mu);
    stage = 2;
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(woken.load(), 4);
}

TEST(Notification, WaitReturnsAfterNotify) {
  Notification n;
  std::thread t([&] { n.Notify(); });
  n.WaitForNotification();
  EXPECT_TRUE(n.HasBeenNotified());
  t.join();
  Notification never;
  EXPECT_FALSE(never.WaitForNotificationWithTimeout(absl::Milliseconds(20)));
}

}  // namespace
}  // namespace reasonalloc
