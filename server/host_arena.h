// A POSIX shared-memory arena owned by the server: shm_open with an unguessable name, O_EXCL, mode
// 0600, sized and mapped; unmapped and unlinked when destroyed (CloseSession, lease expiry).
#ifndef REASONALLOC_SERVER_HOST_ARENA_H_
#define REASONALLOC_SERVER_HOST_ARENA_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/arena.h"

namespace reasonalloc {

class HostArena final : public Arena {
 public:
  // Prefix of every arena name, so that an operator (and the server at start) can find them.
  static constexpr const char* kNamePrefix = "/reasonalloc-";

  static absl::StatusOr<std::unique_ptr<HostArena>> Create(uint64_t bytes);
  ~HostArena() override;
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  const std::string& name() const { return name_; }
  unsigned char* data() const { return data_; }
  uint64_t size() const override { return size_; }
  void DescribeMemory(v1::ArenaDescriptor* out) const override;

  // Unlinks arenas left in /dev/shm by a server of this uid that is no longer running (a crash);
  // returns how many were removed.
  // Unlinks every arena of this process (mapped ones stay usable until unmapped); for an exit that
  // skips the sessions' destructors. Returns how many.
  static int RemoveOwn();
  static int RemoveStale();

 private:
  HostArena(std::string name, unsigned char* data, uint64_t size)
      : name_(std::move(name)), data_(data), size_(size) {}
  std::string name_;
  unsigned char* data_;
  uint64_t size_;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_HOST_ARENA_H_
