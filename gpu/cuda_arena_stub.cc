// CPU-only builds: CUDA arenas are not available, and every entry point says so.
#include "gpu/cuda_arena.h"

namespace reasonalloc::gpu {
namespace {

absl::Status NotBuilt() {
  return absl::UnavailableError(
      "this build has no CUDA backend (configured with REASONALLOC_CUDA=OFF or without nvcc)");
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaArena>> CudaArena::Create(int, uint64_t) { return NotBuilt(); }
CudaArena::~CudaArena() = default;
absl::Status CudaArena::CopyToHost(uint64_t, void*, uint64_t) const { return NotBuilt(); }
absl::Status CudaArena::CopyFromHost(uint64_t, const void*, uint64_t) { return NotBuilt(); }

absl::StatusOr<std::unique_ptr<CudaArenaMapping>> CudaArenaMapping::Open(const std::string&,
                                                                         uint64_t,
                                                                         const std::string&,
                                                                         uint64_t) {
  return NotBuilt();
}
CudaArenaMapping::~CudaArenaMapping() = default;
absl::Status CudaArenaMapping::CopyToHost(uint64_t, void*, uint64_t) const { return NotBuilt(); }
absl::Status CudaArenaMapping::CopyFromHost(uint64_t, const void*, uint64_t) { return NotBuilt(); }

}  // namespace reasonalloc::gpu
