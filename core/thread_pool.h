// A small fixed pool of worker threads for the engine's per-(layer, head) loops. One process-wide
// pool (Shared) sized to the hardware; ParallelFor runs a loop on it and on the calling thread and
// returns when every index is done. Calls from several threads at once are safe: each call has its
// own work.
#ifndef REASONALLOC_CORE_THREAD_POOL_H_
#define REASONALLOC_CORE_THREAD_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace reasonalloc {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  static ThreadPool& Shared();
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(i) for i in [0, n), spread over the pool and the caller. An exception thrown by fn
  // (std::bad_alloc, say) never ends a worker: every index still runs, and the first exception is
  // rethrown on the calling thread once all are done.
  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  void Worker();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_THREAD_POOL_H_
