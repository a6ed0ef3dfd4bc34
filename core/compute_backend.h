// The compute backend under the engine: what differs between the CPU and the CUDA engine.
//
// A batch is one or more events of one session configuration. The engine (RunBatch) owns the
// order and everything that is the same on every backend: the allocator's layer budgets and its
// head routing from pool counts (core/allocator.h), each head's kept count, the decisions'
// offsets and evicted tokens, and the stage timings. A backend scores, counts each layer's pool
// and selects the kept positions:
//
//   Score → [PoolCounts → RouteFromPoolCounts | LayerBudgets] → bookkeeping → Select
//
// The CPU backend (core/engine.cc) runs the scorers of core/scorers/ and the selector on host
// memory; the CUDA backend (gpu/gpu_engine.cc) runs its kernels on device memory, batched over
// sessions. Both route through the same host code, so equal scores give equal decisions.
//
// Compaction, the last stage, runs later, once the event's decision is known to fit the session's
// memory (server/event_transaction.h): a Compactor moves the kept rows in that memory
// (HostCompactor on host arenas, the CUDA engine on device arenas; inline sessions get theirs
// gathered into the answer by GatherKeptRows).
#ifndef REASONALLOC_CORE_COMPUTE_BACKEND_H_
#define REASONALLOC_CORE_COMPUTE_BACKEND_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "core/engine.h"
#include "core/session_config.h"

namespace reasonalloc {

class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;
  // Scores every candidate of every head of the batch (protected positions raised as
  // ProtectScores does). An error names the event it comes from.
  virtual absl::Status Score() = 0;
  // Head-routing allocators only: per (event, head), [events · L · Hkv], the head's candidates
  // above and equal to the k[l]-th largest score of its layer's pool (allocator.h); k is [L], the
  // same for every event of the batch.
  virtual absl::Status PoolCounts(std::span<const int64_t> k, std::span<int64_t> greater,
                                  std::span<int64_t> equal) = 0;
  // Writes each head's KeptCount(n, budget) positions, ascending, into decisions[e].kept_indices
  // (sized by the engine from head_offsets).
  virtual absl::Status Select(std::span<Decision> decisions) = 0;
};

// Moves each head's kept rows of K and V (decision.Kept(i), positions relative to old_offsets[i],
// rows of `row_bytes`) to new_offsets[i] onward, in place, in the backend's memory. Both backends
// hold their scratch before any row moves (HostCompactor allocates it first; GpuEngine reserves it
// when a session is created), so a refusal for memory leaves the rows as they were. A device fault
// part-way (CUDA) can leave K moved and V not: the error says so and the session is not committed.
class Compactor {
 public:
  virtual ~Compactor() = default;
  virtual absl::Status CompactInPlace(const Decision& decision,
                                      std::span<const int64_t> old_offsets,
                                      std::span<const int64_t> new_offsets, size_t row_bytes,
                                      void* k, void* v) = 0;
};

// The CPU backend's compaction, on host memory; keeps its scratch between events.
class HostCompactor final : public Compactor {
 public:
  absl::Status CompactInPlace(const Decision& decision, std::span<const int64_t> old_offsets,
                              std::span<const int64_t> new_offsets, size_t row_bytes, void* k,
                              void* v) override;

 private:
  std::vector<unsigned char> scratch_;
};

// Runs a batch through `backend`: one decision per element of `lengths` (each [L · Hkv], in
// range: the caller checked its inputs), with score, allocate and select times.
absl::StatusOr<std::vector<Decision>> RunBatch(const SessionConfig& config,
                                               const ProfileDemand& demand,
                                               std::span<const std::span<const int32_t>> lengths,
                                               ComputeBackend& backend);

// The checks every backend makes on an event before any work: lengths in [0, n_max] and the
// event's work within kMaxEventWork (by `scorer`'s cost model), errors naming `fields`.
absl::Status CheckEventShape(const SessionConfig& config, const Scorer& scorer,
                             std::span<const int32_t> lengths, int64_t n_max,
                             const InputFields& fields);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_COMPUTE_BACKEND_H_
