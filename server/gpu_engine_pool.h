// One CUDA compute engine per (device, session configuration, layer profile), shared by every
// CUDA session that has them: their events can then run as one batch (one launch set), and a
// thousand sessions of one model hold one stream and one set of scratch buffers, not a thousand.
// An engine lives while a session holds it.
#ifndef REASONALLOC_SERVER_GPU_ENGINE_POOL_H_
#define REASONALLOC_SERVER_GPU_ENGINE_POOL_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/session_config.h"
#include "core/sync.h"
#include "gpu/gpu_engine.h"

namespace reasonalloc {

class GpuEnginePool {
 public:
  // The shared engine for these, created on first use.
  absl::StatusOr<std::shared_ptr<gpu::GpuEngine>> Get(int device, const SessionConfig& config,
                                                      const ProfileDemand& demand)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Engines alive now.
  int size() const ABSL_LOCKS_EXCLUDED(mu_);

  // What makes two sessions share an engine: everything the engine computes with.
  static std::string Key(int device, const SessionConfig& config, const ProfileDemand& demand);

 private:
  mutable Mutex mu_;
  std::map<std::string, std::weak_ptr<gpu::GpuEngine>> engines_ ABSL_GUARDED_BY(mu_);
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_GPU_ENGINE_POOL_H_
