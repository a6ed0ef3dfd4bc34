// One interface for the two kinds of arena memory the server owns: host POSIX shared memory
// (server/host_arena.h) and CUDA device memory exported with CUDA IPC (server/device_arena.h). A
// session's arenas are described to the worker through it; what lies inside (arrays, layout
// version) is the session's business (server/session_arenas.h).
#ifndef REASONALLOC_SERVER_ARENA_H_
#define REASONALLOC_SERVER_ARENA_H_

#include <cstdint>

#include "reasonalloc/v1/types.pb.h"

namespace reasonalloc {

class Arena {
 public:
  virtual ~Arena() = default;
  virtual uint64_t size() const = 0;
  // Sets memory, byte_length and how to reach the bytes: shm_name, or cuda_ipc_handle,
  // cuda_byte_offset and device_uuid.
  virtual void DescribeMemory(v1::ArenaDescriptor* out) const = 0;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_ARENA_H_
