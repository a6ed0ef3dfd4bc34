// Parts of the device probe that do not depend on whether CUDA is built.
#include <cstdio>
#include <string>

#include "gpu/device_probe.h"

namespace reasonalloc::gpu {

std::string FormatDriverVersion(int version) {
  if (version <= 0) return "";
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

std::string FormatGpuUuid(const unsigned char b[16]) {
  char uuid[64];
  std::snprintf(uuid, sizeof(uuid),
                "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                b[14], b[15]);
  return uuid;
}

}  // namespace reasonalloc::gpu
