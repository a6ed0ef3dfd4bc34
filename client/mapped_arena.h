// A session arena (ArenaDescriptor, MEMORY_KIND_HOST_SHM) mapped into the worker's process, with
// checked access to its arrays. The server owns the arena's lifetime: unmap (destroy this) before
// or soon after closing the session.
#ifndef REASONALLOC_CLIENT_MAPPED_ARENA_H_
#define REASONALLOC_CLIENT_MAPPED_ARENA_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "reasonalloc/v1/types.pb.h"

namespace reasonalloc {

class MappedArena {
 public:
  // Opens and maps the arena; checks the layout version, that the shared-memory object is at least
  // byte_length long and that every array lies inside it.
  static absl::StatusOr<std::unique_ptr<MappedArena>> Map(const v1::ArenaDescriptor& descriptor);
  ~MappedArena();
  MappedArena(const MappedArena&) = delete;
  MappedArena& operator=(const MappedArena&) = delete;

  const v1::ArenaDescriptor& descriptor() const { return descriptor_; }
  unsigned char* data() const { return data_; }
  // Base of the array `name` (NOT_FOUND if the arena has none).
  absl::StatusOr<unsigned char*> Array(const std::string& name) const;
  template <typename T>
  T* As(const std::string& name) const {
    auto p = Array(name);
    return p.ok() ? reinterpret_cast<T*>(*p) : nullptr;
  }

 private:
  MappedArena(v1::ArenaDescriptor d, unsigned char* data)
      : descriptor_(std::move(d)), data_(data) {}
  v1::ArenaDescriptor descriptor_;
  unsigned char* data_;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_CLIENT_MAPPED_ARENA_H_
