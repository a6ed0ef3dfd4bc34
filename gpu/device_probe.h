// Discovers CUDA devices without requiring a driver at link or start time: a host without a GPU (or
// without the driver) gets an empty list and the reason, never a crash. Callers never include CUDA
// headers.
#ifndef REASONALLOC_GPU_DEVICE_PROBE_H_
#define REASONALLOC_GPU_DEVICE_PROBE_H_

#include <string>
#include <vector>

namespace reasonalloc::gpu {

struct DeviceInfo {
  int index = 0;
  std::string name;
  std::string uuid;  // "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
  int compute_major = 0;
  int compute_minor = 0;
  unsigned long long total_memory_bytes = 0;
};

struct ProbeResult {
  std::vector<DeviceInfo> devices;
  int driver_version = 0;  // e.g. 13000; 0 when no driver
  int runtime_version = 0;
  std::string reason;  // why no device was found; empty when devices is non-empty
};

// True when this binary was built with the CUDA backend.
bool CudaBuilt();
ProbeResult ProbeDevices();
std::string FormatDriverVersion(int version);  // 13000 -> "13.0"
// 16 UUID bytes -> "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (nvidia-smi's spelling).
std::string FormatGpuUuid(const unsigned char bytes[16]);

}  // namespace reasonalloc::gpu

#endif  // REASONALLOC_GPU_DEVICE_PROBE_H_
