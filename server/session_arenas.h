// The host shared-memory arenas of one MEMORY_KIND_HOST_SHM session (managed: kv, query ring and
// result; advisory: the result only, the worker's keys and queries are ExternalBuffers)
// (core/arena_layout.h is the layout), and the two halves of a compression event on them: reading
// the worker's keys and query ring, and writing the decision back (compaction in place, result
// block, epoch last).
//
// Everything the worker can write is read once and checked; the head regions (offsets,
// capacities) the sidecar relies on are its own copies, only published to the result block, so a
// worker scribbling on shared memory can corrupt its own session's data but never make the sidecar
// read or write outside the arenas. Used only by the holder of the session's compress guard.
#ifndef REASONALLOC_SERVER_SESSION_ARENAS_H_
#define REASONALLOC_SERVER_SESSION_ARENAS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/arena_layout.h"
#include "core/compute_backend.h"
#include "core/engine.h"
#include "core/session_config.h"
#include "reasonalloc/v1/types.pb.h"
#include "server/arena.h"
#include "server/external_buffers.h"
#include "server/host_arena.h"

namespace reasonalloc {

// Views of the session's reusable fp32 buffers (valid until the next Read).
struct ArenaInputs {
  const float* query_window = nullptr;  // [L, Hq, window, d], oldest query first
  const float* keys = nullptr;          // [L, Hkv, n_max, d]
  std::vector<int32_t> lengths;         // [L * Hkv]
  // h2o sessions whose worker filled the h2o_acc arena: [L, Hkv, n_max] fp32; empty otherwise.
  std::vector<float> attention;
  int64_t n_max = 0;
  CompressInputs view() const { return {query_window, keys, n_max, lengths, {}}; }
};

// The worker's "len" of one head, read from the result block: in [0, its capacity].
absl::Status CheckHeadLength(const SessionConfig& config, int64_t head, int32_t n,
                             int32_t capacity);
// Whether a decision's head regions (budget + buffer rows each) fit the session's layout: the kv
// arena's rows and the keep mask's words. Host and CUDA arenas check before committing.
absl::Status CheckRegionsFit(const Decision& decision, int buffer, const SessionLayout& layout);
// The result block's keep_mask: [heads, words] bits of the kept pre-event positions.
std::vector<uint64_t> ResultKeepMask(const Decision& decision, int words);

// Appends the descriptor of one arena (memory from `arena`, arrays from `layout`).
void DescribeArena(const Arena& arena, const ArenaLayout& layout, DType model_dtype,
                   google::protobuf::RepeatedPtrField<v1::ArenaDescriptor>* out);

class SessionArenas {
 public:
  static absl::StatusOr<std::unique_ptr<SessionArenas>> Create(const SessionConfig& config);

  uint64_t bytes() const;
  void Describe(google::protobuf::RepeatedPtrField<v1::ArenaDescriptor>* out) const;

  // Advisory sessions: the worker's buffers the next events read (replacing earlier ones).
  bool advisory() const { return !config_.managed; }
  void Register(std::unique_ptr<ExternalBuffers> buffers) { external_ = std::move(buffers); }

  // The event's inputs: each head's live rows ("len", checked against its capacity) and the α
  // newest queries of the ring (slot s mod α for steps step − α + 1 .. step).
  // `max_bytes` (0 = none) bounds the fp32 copy of the live keys this makes, checked from "len"
  // before anything is allocated (RESOURCE_EXHAUSTED naming "len").
  absl::StatusOr<ArenaInputs> Read(int64_t step, uint64_t max_bytes = 0);
  // Checks that the decision's regions fit before anything is committed.
  absl::Status CheckFits(const Decision& decision) const;
  // Managed: compacts K and V in place into the decision's head regions (which become the
  // sidecar's own copy) with the CPU backend's compactor. Advisory: takes the regions only. Call
  // after CheckFits, before the commit; on error the arenas are as they were.
  absl::Status Compact(const Decision& decision);
  // After the commit: writes len, offset (0 in advisory sessions), capacity, budget, keep_mask and
  // finally epoch (release order), and clears the h2o accumulator arena.
  void Publish(const Decision& decision, uint64_t epoch);
  // Tests: the bytes of arena `kind` ("kv", "query_ring", "result", "h2o_acc"; null if absent).
  unsigned char* DataForTest(const std::string& kind) const;

 private:
  explicit SessionArenas(const SessionConfig& config);
  int32_t* Int32(const char* name) const;
  int64_t* Int64(const char* name) const;
  uint64_t* Uint64(const char* name) const;

  SessionConfig config_;
  SessionLayout layout_;
  std::unique_ptr<HostArena> kv_, ring_, result_;  // kv_ and ring_: managed sessions only
  std::unique_ptr<HostArena> h2o_;                 // managed h2o sessions only
  std::unique_ptr<ExternalBuffers> external_;      // advisory sessions, once registered
  std::vector<int64_t> offsets_;                   // the sidecar's own copy of the head regions
  std::vector<int32_t> capacities_;
  HostCompactor compactor_;  // keeps its scratch between events
  // fp32 copies of the event's keys and queries, kept across events (no allocation, no page
  // faults in the steady state).
  std::vector<float> keys_, queries_;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_SESSION_ARENAS_H_
