// CUDA arenas: device memory the sidecar owns and exports to the worker with CUDA IPC, the GPU
// counterpart of server/host_arena.h. Plain C++ header (no CUDA types), so the server and the tests
// compile the same way with and without the CUDA backend; without it every call reports why.
//
// Export: one cudaMalloc base allocation per arena, exported with cudaIpcGetMemHandle. A descriptor
// carries the 64 handle bytes, the arena's byte offset inside the exported allocation (0 here; the
// worker side honours any offset) and the UUID of the device holding it. Lifetime belongs to the
// server: the memory is freed when the CudaArena is destroyed (CloseSession, lease expiry). CUDA
// leaves freeing an exported allocation that another process still has open undefined, so the
// worker closes its mapping (CudaArenaMapping's destructor) before it ends the session.
#ifndef REASONALLOC_GPU_CUDA_ARENA_H_
#define REASONALLOC_GPU_CUDA_ARENA_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace reasonalloc::gpu {

inline constexpr size_t kIpcHandleBytes = 64;  // sizeof(cudaIpcMemHandle_t)

class CudaArena {
 public:
  // `bytes` of zeroed memory on CUDA device `device`.
  static absl::StatusOr<std::unique_ptr<CudaArena>> Create(int device, uint64_t bytes);
  ~CudaArena();
  CudaArena(const CudaArena&) = delete;
  CudaArena& operator=(const CudaArena&) = delete;

  int device() const { return device_; }
  uint64_t size() const { return size_; }
  void* device_ptr() const { return ptr_; }
  const std::string& ipc_handle() const { return handle_; }  // kIpcHandleBytes bytes
  uint64_t byte_offset() const { return 0; }
  const std::string& device_uuid() const { return uuid_; }

  // Synchronous copies between this arena and host memory; bounds are checked.
  absl::Status CopyToHost(uint64_t offset, void* dst, uint64_t bytes) const;
  absl::Status CopyFromHost(uint64_t offset, const void* src, uint64_t bytes);

 private:
  CudaArena() = default;
  int device_ = 0;
  uint64_t size_ = 0;
  void* ptr_ = nullptr;
  std::string handle_;
  std::string uuid_;
};

// The worker's side: an exported arena of another process, opened with cudaIpcOpenMemHandle on
// the device whose UUID the descriptor names.
class CudaArenaMapping {
 public:
  static absl::StatusOr<std::unique_ptr<CudaArenaMapping>> Open(const std::string& ipc_handle,
                                                                uint64_t byte_offset,
                                                                const std::string& device_uuid,
                                                                uint64_t bytes);
  ~CudaArenaMapping();
  CudaArenaMapping(const CudaArenaMapping&) = delete;
  CudaArenaMapping& operator=(const CudaArenaMapping&) = delete;

  void* device_ptr() const { return static_cast<char*>(base_) + offset_; }
  uint64_t size() const { return size_; }
  absl::Status CopyToHost(uint64_t offset, void* dst, uint64_t bytes) const;
  absl::Status CopyFromHost(uint64_t offset, const void* src, uint64_t bytes);

 private:
  CudaArenaMapping() = default;
  [[maybe_unused]] int device_ = 0;  // unused where the backend is built without CUDA
  void* base_ = nullptr;
  uint64_t offset_ = 0;
  uint64_t size_ = 0;
};

}  // namespace reasonalloc::gpu

#endif  // REASONALLOC_GPU_CUDA_ARENA_H_
