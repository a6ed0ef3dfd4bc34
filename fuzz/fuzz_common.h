// What the structured fuzz targets share: a small session geometry drawn from the input, and one
// POSIX shared-memory object per run for the targets whose descriptors must name a real one.
#ifndef REASONALLOC_FUZZ_FUZZ_COMMON_H_
#define REASONALLOC_FUZZ_FUZZ_COMMON_H_

#include <fcntl.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/session_config.h"

namespace reasonalloc::fuzz {

inline DType PickDType(FuzzedDataProvider& in) {
  return static_cast<DType>(in.ConsumeIntegralInRange<int>(0, 2));
}

// At most 3 layers × 3 KV heads (GQA group 1 or 2), d ≤ 8, window ≤ 4, budget ≤ 64, Δ ≤ 16,
// max_context ≤ `max_context`. The caller validates it (ValidateSessionConfig).
inline SessionConfig PickSmallConfig(FuzzedDataProvider& in, int max_context, bool managed) {
  SessionConfig config;
  auto& m = config.model;
  m.name = "fuzz";
  m.num_layers = in.ConsumeIntegralInRange<int>(1, 3);
  m.num_kv_heads = in.ConsumeIntegralInRange<int>(1, 3);
  m.num_q_heads = m.num_kv_heads * in.ConsumeIntegralInRange<int>(1, 2);
  m.head_dim = in.ConsumeIntegralInRange<int>(1, 8);
  m.dtype = PickDType(in);
  m.max_context = in.ConsumeIntegralInRange<int>(1, max_context);
  config.budget.window = in.ConsumeIntegralInRange<int>(1, 4);
  config.budget.budget = in.ConsumeIntegralInRange<int>(config.budget.window, 64);
  config.budget.buffer = in.ConsumeIntegralInRange<int>(0, 16);
  config.managed = managed;
  return config;
}

// A shared-memory object of `bytes` named "/ra-fuzz-<tag>-<pid>", created once per process and
// unlinked at exit.
struct SharedObject {
  std::string name;
  int fd = -1;
};
template <const char* kTag>
const SharedObject& TheSharedObject(uint64_t bytes) {
  static const SharedObject* object = [bytes] {
    auto* o = new SharedObject{absl::StrCat("/ra-fuzz-", kTag, "-", getpid()), -1};
    o->fd = shm_open(o->name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    if (o->fd < 0 || ftruncate(o->fd, static_cast<off_t>(bytes)) != 0) std::abort();
    return o;
  }();
  static const bool unlink_at_exit = [] {
    std::atexit([] { shm_unlink(object->name.c_str()); });
    return true;
  }();
  (void)unlink_at_exit;
  return *object;
}

}  // namespace reasonalloc::fuzz

#endif  // REASONALLOC_FUZZ_FUZZ_COMMON_H_
