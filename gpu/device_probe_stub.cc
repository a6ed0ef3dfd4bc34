// Built instead of device_probe.cu when the CUDA backend is off.
#include <string>

#include "gpu/device_probe.h"

namespace reasonalloc::gpu {

bool CudaBuilt() { return false; }

ProbeResult ProbeDevices() {
  ProbeResult out;
  out.reason = "this build has no CUDA backend (configured with REASONALLOC_CUDA=OFF)";
  return out;
}

}  // namespace reasonalloc::gpu
