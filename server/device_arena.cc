#include "server/device_arena.h"

namespace reasonalloc {

absl::StatusOr<std::unique_ptr<DeviceArena>> DeviceArena::Create(int device, uint64_t bytes) {
  auto arena = gpu::CudaArena::Create(device, bytes);
  if (!arena.ok()) return arena.status();
  return std::unique_ptr<DeviceArena>(new DeviceArena(std::move(arena).value()));
}

void DeviceArena::DescribeMemory(v1::ArenaDescriptor* out) const {
  out->set_memory(v1::MEMORY_KIND_CUDA_IPC);
  out->set_byte_length(arena_->size());
  out->set_cuda_ipc_handle(arena_->ipc_handle());
  out->set_cuda_byte_offset(arena_->byte_offset());
  out->set_device_uuid(arena_->device_uuid());
}

}  // namespace reasonalloc
