// The CUDA compute backend: one compression event per session, batched over sessions and layers,
// with the decisions of the CPU engine (core/engine.h). Plain C++ header (no CUDA types); without
// the CUDA backend, or without a GPU, Create says why.
//
// An event is a handful of launches on the engine's stream: the scorer's kernels (window logits
// with the GQA reduction; softmax, window mean and pooling; for rkv the normalised-key Gram rows
// with the retain-last partner, then the column means and the mix), the pooled per-layer threshold
// of head-wise allocators (radix select), per-head top-k with ties to the lower index (radix select
// plus a block scan) writing the kept indices and the keep bitmask, and, in managed mode, the
// compaction gather. The allocators' integer routing runs on the host from per-head counts made on
// the GPU (RouteFromPoolCounts, the CPU engine's own path), so equal counts give equal budgets.
//
// Scores differ from the CPU's by float rounding only (different summation order, device expf);
// decisions are identical except where two candidates' scores lie within that rounding of each
// other (tests/gpu/gpu_engine_test.cc measures and bounds it).
#ifndef REASONALLOC_GPU_GPU_ENGINE_H_
#define REASONALLOC_GPU_GPU_ENGINE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "core/compute_backend.h"
#include "core/dtype.h"
#include "core/engine.h"
#include "core/session_config.h"

namespace reasonalloc::gpu {

// One session's event. Pointers are device memory on the engine's device, in `dtype` (the
// session's model.dtype); `lengths` is host memory.
struct DeviceEventInputs {
  const void* query_window = nullptr;  // [L, Hq, window, d]
  const void* keys = nullptr;          // [L, Hkv, n_max, d]
  int64_t n_max = 0;
  std::span<const int32_t> lengths;  // [L * Hkv]
  // h2o: the accumulated attention, fp32 [L, Hkv, n_max]; null = the window's attention (one-shot)
  const float* accumulated = nullptr;
  // Managed arenas (core/arena_layout.h): keys (and the accumulator) are rows [rows, d] with head i
  // starting at row head_row_offsets[i] instead of i·n_max; empty = the dense layout above.
  std::span<const int64_t> head_row_offsets;
  // The query window is a ring: window row a (oldest first) is slot (ring_start + a) mod window.
  int ring_start = 0;
  // Check every live key and window query for NaN/Inf first (INVALID_ARGUMENT naming the head).
  bool check_finite = false;
};

// Managed mode: where the compaction writes each session's kept rows.
struct DeviceGatherTarget {
  const void* src = nullptr;  // [L, Hkv, n_max, row_bytes]
  void* dst = nullptr;        // [L, Hkv, max_kept, row_bytes]; must not overlap src
  int64_t max_kept = 0;
};

// CompressBatch's errors that concern one event (its checks, NaN/Inf in its inputs, logits
// overflowing) carry the event's index in the batch as this payload, so that a caller batching
// several sessions can fail that one and run the others.
inline constexpr char kEventIndexPayload[] = "type.reasonalloc/batch-event-index";
inline std::optional<size_t> EventIndexOf(const absl::Status& status) {
  const auto p = status.GetPayload(kEventIndexPayload);
  size_t index = 0;
  if (!p.has_value() || !absl::SimpleAtoi(std::string(*p), &index)) return std::nullopt;
  return index;
}

class GpuEngine final : public Compactor {
 public:
  // An engine for `config` on CUDA device `device`.
  static absl::StatusOr<std::unique_ptr<GpuEngine>> Create(int device, const SessionConfig& config,
                                                           ProfileDemand demand = {});
  ~GpuEngine();
  GpuEngine(const GpuEngine&) = delete;
  GpuEngine& operator=(const GpuEngine&) = delete;

  const SessionConfig& config() const;
  int device() const;

  // One event per element of `events`, all with this engine's configuration, in one set of
  // launches. Checks what Engine::CheckInputs checks, per event; an error names the event by
  // event_names[e] when the caller gives names (its wire path), else as "events[e]", and carries
  // its index (EventIndexOf).
  // Thread-safe (events on one engine run one batch at a time).
  absl::StatusOr<std::vector<Decision>> CompressBatch(
      std::span<const DeviceEventInputs> events, std::span<const std::string> event_names = {});

  // One event's checks (pointers, n_max, lengths and the work limit, head_row_offsets,
  // ring_start), its fields named as DeviceEventInputs names them; CompressBatch runs them for
  // every event. A caller batching several sessions' events checks each alone first, so that one
  // session's bad input fails only that session.
  absl::Status CheckEvent(const DeviceEventInputs& event) const;

  // After CompressBatch: the candidate scores of the last batch, [events][L * Hkv][n - window],
  // copied to the host (tests compare them with the CPU scorer's).
  absl::StatusOr<std::vector<std::vector<std::vector<float>>>> LastScoresForTest();
  // After CompressBatch: the keep bitmask the last batch wrote on the device for event `e`, copied
  // to the host, [L * Hkv][WordsPerHead(n_max)] (the layout of BuildKeepMask).
  absl::StatusOr<std::vector<uint64_t>> LastKeepMaskForTest(int e);
  // After CompressBatch: gathers each event's kept rows of `targets[e].src` to `targets[e].dst`
  // (rows of `row_bytes`) on the device, rows past a head's kept length zeroed, and waits for it.
  absl::Status GatherKeptForTest(std::span<const DeviceGatherTarget> targets, size_t row_bytes);

  // Managed arenas: after CompressBatch of one event whose keys used head_row_offsets, moves each
  // head's kept rows of `k` and `v` ([rows, row_bytes] on the device) from old_offsets[i] +
  // kept position to new_offsets[i] onward, in place (through a device scratch), and waits.
  // The CUDA backend's Compactor (core/compute_backend.h).
  absl::Status CompactInPlace(const Decision& decision, std::span<const int64_t> old_offsets,
                              std::span<const int64_t> new_offsets, size_t row_bytes, void* k,
                              void* v) override;

  // Reserves CompactInPlace's scratch for up to `rows` kept rows of `row_bytes`, so that later
  // compactions of that size allocate nothing (and cannot fail for memory).
  absl::Status ReserveCompaction(int64_t rows, size_t row_bytes);

  // Makes the engine's stream wait for a cudaIpcEventHandle_t (64 bytes) another process recorded:
  // the worker's writes are ordered before the next batch's reads.
  absl::Status WaitIpcEvent(const std::string& handle);

  // Copies between host and device memory on the engine's device (tests and benchmarks).
  absl::StatusOr<void*> Allocate(uint64_t bytes);
  absl::Status Free(void* ptr);
  absl::Status Upload(void* dst, const void* src, uint64_t bytes);
  absl::Status Download(void* dst, const void* src, uint64_t bytes);

  struct Impl;

 private:
  explicit GpuEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace reasonalloc::gpu

#endif  // REASONALLOC_GPU_GPU_ENGINE_H_
