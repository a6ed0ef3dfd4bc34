#include <cuda_runtime.h>

#include <string>

#include "gpu/device_probe.h"

namespace reasonalloc::gpu {

bool CudaBuilt() { return true; }

ProbeResult ProbeDevices() {
  ProbeResult out;
  cudaRuntimeGetVersion(&out.runtime_version);
  // Any error here (no driver: cudaErrorInsufficientDriver; no device: cudaErrorNoDevice) means "no
  // GPU".
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    out.reason = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err);
    cudaGetLastError();
    return out;
  }
  cudaDriverGetVersion(&out.driver_version);
  if (count == 0) {
    out.reason = "no CUDA device visible";
    return out;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    DeviceInfo d;
    d.index = i;
    d.name = prop.name;
    d.uuid = FormatGpuUuid(reinterpret_cast<const unsigned char*>(prop.uuid.bytes));
    d.compute_major = prop.major;
    d.compute_minor = prop.minor;
    d.total_memory_bytes = prop.totalGlobalMem;
    out.devices.push_back(d);
  }
  if (out.devices.empty()) out.reason = "cudaGetDeviceProperties failed for every device";
  return out;
}

}  // namespace reasonalloc::gpu
