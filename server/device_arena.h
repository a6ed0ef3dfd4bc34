// Arena on a CUDA device (gpu/cuda_arena.h), described with its IPC handle, offset and device UUID.
// The server creates them for MEMORY_KIND_CUDA_IPC sessions once the CUDA compute backend runs
// (--device cuda:N); on hosts without one Create says why.
#ifndef REASONALLOC_SERVER_DEVICE_ARENA_H_
#define REASONALLOC_SERVER_DEVICE_ARENA_H_

#include <memory>

#include "absl/status/statusor.h"
#include "gpu/cuda_arena.h"
#include "server/arena.h"

namespace reasonalloc {

class DeviceArena final : public Arena {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceArena>> Create(int device, uint64_t bytes);

  uint64_t size() const override { return arena_->size(); }
  void DescribeMemory(v1::ArenaDescriptor* out) const override;
  gpu::CudaArena& cuda() { return *arena_; }

 private:
  explicit DeviceArena(std::unique_ptr<gpu::CudaArena> arena) : arena_(std::move(arena)) {}
  std::unique_ptr<gpu::CudaArena> arena_;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_DEVICE_ARENA_H_
