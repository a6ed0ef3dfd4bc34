// CPU-only builds: the CUDA compute backend is not available, and Create says so.
#include "gpu/gpu_engine.h"

namespace reasonalloc::gpu {

struct GpuEngine::Impl {
  SessionConfig config;
};

GpuEngine::GpuEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuEngine::~GpuEngine() = default;

absl::StatusOr<std::unique_ptr<GpuEngine>> GpuEngine::Create(int, const SessionConfig&,
                                                             ProfileDemand) {
  return absl::UnavailableError(
      "this build has no CUDA backend (configured with REASONALLOC_CUDA=OFF or without nvcc)");
}

const SessionConfig& GpuEngine::config() const { return impl_->config; }
int GpuEngine::device() const { return -1; }

namespace {
absl::Status NotBuilt() { return absl::UnavailableError("this build has no CUDA backend"); }
}  // namespace

absl::StatusOr<std::vector<Decision>> GpuEngine::CompressBatch(std::span<const DeviceEventInputs>,
                                                               std::span<const std::string>) {
  return NotBuilt();
}
absl::Status GpuEngine::CheckEvent(const DeviceEventInputs&) const { return NotBuilt(); }
absl::StatusOr<std::vector<std::vector<std::vector<float>>>> GpuEngine::LastScoresForTest() {
  return NotBuilt();
}
absl::StatusOr<std::vector<uint64_t>> GpuEngine::LastKeepMaskForTest(int) { return NotBuilt(); }
absl::Status GpuEngine::GatherKeptForTest(std::span<const DeviceGatherTarget>, size_t) {
  return NotBuilt();
}
absl::Status GpuEngine::CompactInPlace(const Decision&, std::span<const int64_t>,
                                       std::span<const int64_t>, size_t, void*, void*) {
  return NotBuilt();
}
absl::Status GpuEngine::WaitIpcEvent(const std::string&) { return NotBuilt(); }
absl::Status GpuEngine::ReserveCompaction(int64_t, size_t) { return NotBuilt(); }
absl::StatusOr<void*> GpuEngine::Allocate(uint64_t) { return NotBuilt(); }
absl::Status GpuEngine::Free(void*) { return NotBuilt(); }
absl::Status GpuEngine::Upload(void*, const void*, uint64_t) { return NotBuilt(); }
absl::Status GpuEngine::Download(void*, const void*, uint64_t) { return NotBuilt(); }

}  // namespace reasonalloc::gpu
