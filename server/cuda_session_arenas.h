// The CUDA arenas of one managed MEMORY_KIND_CUDA_IPC session (the layout of core/arena_layout.h
// in device memory, exported with CUDA IPC) and a compression event on them with the CUDA
// compute backend (gpu/gpu_engine.h): keys and queries never leave the GPU; only "len" (L·Hkv
// int32) comes to the host, and the result block goes back.
//
// Ordering: the worker's writes must be complete before Compress reads them: either the worker
// synchronises its stream before calling Compress, or it records a CUDA event after its writes and
// sends its IPC handle as CompressRequest.cuda_event_handle (the sidecar waits for it first).
//
// As with host arenas, the head regions the sidecar relies on are its own copies; what the worker
// writes ("len", keys, queries) is read once and checked. Used only by the holder of the session's
// compress guard.
#ifndef REASONALLOC_SERVER_CUDA_SESSION_ARENAS_H_
#define REASONALLOC_SERVER_CUDA_SESSION_ARENAS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/arena_layout.h"
#include "core/engine.h"
#include "core/session_config.h"
#include "gpu/gpu_engine.h"
#include "reasonalloc/v1/types.pb.h"
#include "server/device_arena.h"

namespace reasonalloc {

class CudaSessionArenas {
 public:
  // Managed sessions of every scorer but h2o (its accumulator is carried on the host), computed
  // by `engine` (shared with the other sessions of this configuration: GpuEnginePool).
  static absl::StatusOr<std::unique_ptr<CudaSessionArenas>> Create(
      const SessionConfig& config, std::shared_ptr<gpu::GpuEngine> engine);

  uint64_t bytes() const;
  void Describe(google::protobuf::RepeatedPtrField<v1::ArenaDescriptor>* out) const;

  // An event's inputs: waits for `event_handle` (when not empty), reads and checks "len", and
  // returns the engine's inputs over each head's live rows and the query ring's α newest slots
  // (steps step − α + 1 .. step), valid until the next Prepare. The caller decides them with
  // engine().CompressBatch, alone or with other sessions of the same engine (CudaPlane), naming
  // this one "arenas".
  absl::StatusOr<gpu::DeviceEventInputs> Prepare(int64_t step, const std::string& event_handle);
  gpu::GpuEngine& engine() const { return *engine_; }
  absl::Status CheckFits(const Decision& decision) const;
  // Compacts K and V in place on the GPU into the new head regions, before the session commits the
  // event (its scratch is reserved at creation; a device fault here leaves the session as it
  // was).
  absl::Status Compact(const Decision& decision);
  // After the commit: writes len, offset, capacity, budget, keep_mask and finally epoch.
  absl::Status Publish(const Decision& decision, uint64_t epoch);

 private:
  CudaSessionArenas(const SessionConfig& config, std::shared_ptr<gpu::GpuEngine> engine);
  absl::Status WriteResult(const char* name, const void* data, size_t bytes);

  SessionConfig config_;
  SessionLayout layout_;
  std::unique_ptr<DeviceArena> kv_, ring_, result_;
  std::shared_ptr<gpu::GpuEngine> engine_;
  std::vector<int32_t> event_lengths_;  // the prepared event's "len"
  std::vector<int64_t> offsets_;        // the sidecar's own copy of the head regions
  std::vector<int32_t> capacities_;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_CUDA_SESSION_ARENAS_H_
