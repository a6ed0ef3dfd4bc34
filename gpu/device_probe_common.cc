// Parts of the device probe that do not depend on whether CUDA is built.
#include <string>

#include "gpu/device_probe.h"

namespace reasonalloc::gpu {

std::string FormatDriverVersion(int version) {
  if (version <= 0) return "";
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

}  // namespace reasonalloc::gpu
