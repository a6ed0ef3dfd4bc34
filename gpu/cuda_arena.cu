#include <cuda_runtime.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "gpu/cuda_arena.h"
#include "gpu/cuda_status.h"
#include "gpu/device_probe.h"

namespace reasonalloc::gpu {
namespace {

absl::Status CheckRange(uint64_t offset, uint64_t bytes, uint64_t size) {
  if (offset > size || bytes > size - offset) {
    return absl::OutOfRangeError(absl::StrCat("bytes [", offset, ", ", offset, " + ", bytes,
                                              ") lie outside the arena's ", size, " bytes"));
  }
  return absl::OkStatus();
}

// A bounds-checked synchronous copy between `base` (device memory of `size` bytes on `device`) at
// `offset` and host memory.
absl::Status Copy(int device, void* base, uint64_t size, uint64_t offset, void* host,
                  uint64_t bytes, cudaMemcpyKind kind) {
  if (auto s = CheckRange(offset, bytes, size); !s.ok()) return s;
  cudaSetDevice(device);
  char* dev = static_cast<char*>(base) + offset;
  const cudaError_t err = kind == cudaMemcpyDeviceToHost ? cudaMemcpy(host, dev, bytes, kind)
                                                         : cudaMemcpy(dev, host, bytes, kind);
  if (err != cudaSuccess) return CudaStatus("cudaMemcpy", err);
  // A copy from pageable memory may return once staged, before its DMA lands; the other process
  // (and the sidecar's non-blocking streams) must see the bytes once this returns.
  if (kind == cudaMemcpyHostToDevice) {
    if (cudaError_t sync = cudaStreamSynchronize(nullptr); sync != cudaSuccess) {
      return CudaStatus("cudaStreamSynchronize", sync);
    }
  }
  return absl::OkStatus();
}

// The device whose UUID is `uuid`, or NOT_FOUND.
absl::StatusOr<int> DeviceByUuid(const std::string& uuid) {
  int count = 0;
  if (cudaError_t err = cudaGetDeviceCount(&count); err != cudaSuccess) {
    return CudaStatus("cudaGetDeviceCount", err);
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    if (FormatGpuUuid(reinterpret_cast<const unsigned char*>(prop.uuid.bytes)) == uuid) return i;
  }
  return absl::NotFoundError(
      absl::StrCat("device_uuid \"", uuid.substr(0, 64), "\" is not a visible CUDA device"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaArena>> CudaArena::Create(int device, uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("a CUDA arena needs at least one byte");
  if (cudaError_t err = cudaSetDevice(device); err != cudaSuccess) {
    return CudaStatus("cudaSetDevice", err);
  }
  std::unique_ptr<CudaArena> a(new CudaArena());
  a->device_ = device;
  a->size_ = bytes;
  if (cudaError_t err = cudaMalloc(&a->ptr_, bytes); err != cudaSuccess) {
    a->ptr_ = nullptr;
    return CudaStatus("cudaMalloc", err);
  }
  if (cudaError_t err = cudaMemset(a->ptr_, 0, bytes); err != cudaSuccess) {
    return CudaStatus("cudaMemset", err);
  }
  cudaIpcMemHandle_t handle;
  if (cudaError_t err = cudaIpcGetMemHandle(&handle, a->ptr_); err != cudaSuccess) {
    return CudaStatus("cudaIpcGetMemHandle", err);
  }
  static_assert(sizeof(handle) == kIpcHandleBytes);
  a->handle_.assign(reinterpret_cast<const char*>(&handle), sizeof(handle));
  cudaDeviceProp prop{};
  if (cudaError_t err = cudaGetDeviceProperties(&prop, device); err != cudaSuccess) {
    return CudaStatus("cudaGetDeviceProperties", err);
  }
  a->uuid_ = FormatGpuUuid(reinterpret_cast<const unsigned char*>(prop.uuid.bytes));
  return a;
}

CudaArena::~CudaArena() {
  if (ptr_ != nullptr) {
    cudaSetDevice(device_);
    cudaFree(ptr_);
  }
}

absl::Status CudaArena::CopyToHost(uint64_t offset, void* dst, uint64_t bytes) const {
  return Copy(device_, ptr_, size_, offset, dst, bytes, cudaMemcpyDeviceToHost);
}

absl::Status CudaArena::CopyFromHost(uint64_t offset, const void* src, uint64_t bytes) {
  return Copy(device_, ptr_, size_, offset, const_cast<void*>(src), bytes, cudaMemcpyHostToDevice);
}

absl::StatusOr<std::unique_ptr<CudaArenaMapping>> CudaArenaMapping::Open(
    const std::string& ipc_handle, uint64_t byte_offset, const std::string& device_uuid,
    uint64_t bytes) {
  if (ipc_handle.size() != kIpcHandleBytes) {
    return absl::InvalidArgumentError(absl::StrCat("cuda_ipc_handle has ", ipc_handle.size(),
                                                   " bytes; a CUDA IPC handle has ",
                                                   kIpcHandleBytes));
  }
  auto device = DeviceByUuid(device_uuid);
  if (!device.ok()) return device.status();
  if (cudaError_t err = cudaSetDevice(*device); err != cudaSuccess) {
    return CudaStatus("cudaSetDevice", err);
  }
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, ipc_handle.data(), sizeof(handle));
  std::unique_ptr<CudaArenaMapping> m(new CudaArenaMapping());
  m->device_ = *device;
  m->offset_ = byte_offset;
  m->size_ = bytes;
  if (cudaError_t err = cudaIpcOpenMemHandle(&m->base_, handle, cudaIpcMemLazyEnablePeerAccess);
      err != cudaSuccess) {
    m->base_ = nullptr;
    return CudaStatus("cudaIpcOpenMemHandle", err);
  }
  return m;
}

CudaArenaMapping::~CudaArenaMapping() {
  if (base_ != nullptr) {
    cudaSetDevice(device_);
    cudaIpcCloseMemHandle(base_);
  }
}

absl::Status CudaArenaMapping::CopyToHost(uint64_t offset, void* dst, uint64_t bytes) const {
  return Copy(device_, device_ptr(), size_, offset, dst, bytes, cudaMemcpyDeviceToHost);
}

absl::Status CudaArenaMapping::CopyFromHost(uint64_t offset, const void* src, uint64_t bytes) {
  return Copy(device_, device_ptr(), size_, offset, const_cast<void*>(src), bytes,
              cudaMemcpyHostToDevice);
}

}  // namespace reasonalloc::gpu
