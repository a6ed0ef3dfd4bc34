// The compression engine: Scorer -> Allocator -> Selector (-> Compactor in managed mode),
// device-agnostic and free of gRPC. One Engine serves one session configuration; Compress is const
// and thread-safe. It runs on the CPU backend; the order of an event and its bookkeeping are
// RunBatch's (core/compute_backend.h), which the CUDA backend shares.
//
// Tensors are fp32 here; inline_inputs.h validates and converts what arrives on the wire.
#ifndef REASONALLOC_CORE_ENGINE_H_
#define REASONALLOC_CORE_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/allocator.h"
#include "core/scorer.h"
#include "core/session_config.h"

namespace reasonalloc {

// How a session's inputs are named in error messages: the request fields of an inline event, the
// arena arrays of a shared-memory one.
struct InputFields {
  const char* keys = "inline_tensors.keys";
  const char* queries = "inline_tensors.query_window";
  const char* lengths = "inline_tensors.lengths";
  const char* attention = "inline_tensors.attention";
};
inline constexpr InputFields kArenaFields{"kv arena \"k\"", "query_ring arena \"q\"",
                                          "result arena \"len\"", "h2o_acc arena \"attention\""};

struct CompressInputs {
  const float* query_window = nullptr;  // [L, Hq, window, d]
  const float* keys = nullptr;          // [L, Hkv, n_max, d]
  int64_t n_max = 0;
  std::span<const int32_t> lengths;  // [L * Hkv], each in [0, n_max]
  // Polled between heads once `cancel_poll_work` multiply-adds have passed since the last poll (a
  // gRPC cancellation check costs ~100 µs, more than a small event); when it returns true the event
  // stops with CANCELLED (caller gone, drain deadline).
  std::function<bool()> cancelled;
  int64_t cancel_poll_work = int64_t{1} << 24;
  // h2o: the attention accumulated per token, [L, Hkv, n_max] (H2oAccumulator::Prepare). When null
  // an h2o event scores the attention of the whole query window, as at a session's first event.
  const float* accumulated = nullptr;
  // Most bytes of scratch the event may allocate (scores, per-thread scorer scratch, selection,
  // the one-shot h2o accumulator); 0 = no limit. Checked from the shapes before anything is
  // allocated (Engine::EventBytes).
  uint64_t max_event_bytes = 0;
  InputFields fields = InputFields();
};

// Most multiply-adds one event may cost; beyond it Compress is RESOURCE_EXHAUSTED before any work,
// so one request cannot hold a core for hours. 2^36 is about a minute of the CPU reference on one
// core and far above a Llama-70B event (80 layers · 8 kv heads · 8 queries · 8 window · 4k tokens ·
// 128).
inline constexpr int64_t kMaxEventWork = int64_t{1} << 36;

struct StageSeconds {
  double score = 0, allocate = 0, select = 0, compact = 0, total = 0;
};

struct Decision {
  int num_layers = 0;
  int num_kv_heads = 0;
  std::vector<int32_t> budgets;       // [L * Hkv]
  std::vector<int32_t> kept_lengths;  // [L * Hkv]
  std::vector<int32_t> kept_indices;  // concatenated, ascending per head
  std::vector<int64_t> head_offsets;  // [L * Hkv + 1] into kept_indices
  int64_t evicted_tokens = 0;
  StageSeconds seconds;

  int max_kept() const;
  std::span<const int32_t> Kept(int64_t head) const {
    return std::span<const int32_t>(kept_indices)
        .subspan(static_cast<size_t>(head_offsets[static_cast<size_t>(head)]),
                 static_cast<size_t>(kept_lengths[static_cast<size_t>(head)]));
  }
};

class Engine {
 public:
  // `demand`: the model's layer profile for reasonalloc (its layer demand D, [L], and for the
  // static mode its head demand); empty = uniform layers.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const SessionConfig& config,
                                                        ProfileDemand demand = {});

  const SessionConfig& config() const { return config_; }
  const ProfileDemand& demand() const { return demand_; }
  const std::vector<double>& layer_demand() const { return demand_.layers; }
  // Lengths in range and the event's work within kMaxEventWork (Compress checks it too; callers
  // that prepare per-event state first, like the h2o accumulator, check before).
  absl::Status CheckInputs(const CompressInputs& in) const;
  // Bytes of scratch Compress allocates for these inputs, from their shapes: what
  // CompressInputs::max_event_bytes bounds.
  uint64_t EventBytes(const CompressInputs& in) const;
  absl::StatusOr<Decision> Compress(const CompressInputs& in) const;

 private:
  Engine(SessionConfig config, std::unique_ptr<Scorer> scorer, ProfileDemand demand);
  absl::StatusOr<Decision> Run(const CompressInputs& in) const;

  SessionConfig config_;
  std::unique_ptr<Scorer> scorer_;
  ProfileDemand demand_;
};

// The decision of an event that evicts nothing (calibration sessions): every head keeps all its
// tokens and its budget is its length.
Decision KeepAll(int num_layers, int num_kv_heads, std::span<const int32_t> lengths);

// Keep bitmask of the pre-event positions: [L * Hkv, words_per_head] uint64 words, bit j set when j
// is kept.
int WordsPerHead(int64_t n_max);
std::vector<uint64_t> BuildKeepMask(const Decision& decision, int64_t n_max);

// Compactor: gathers each head's kept rows of `src` ([L, Hkv, n_max, row_bytes]) to the start of
// the head in `dst` ([L, Hkv, max_kept, row_bytes]); rows past a head's kept length are zeroed.
void GatherKeptRows(const Decision& decision, const void* src, int64_t n_max, size_t row_bytes,
                    int64_t max_kept, void* dst);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_ENGINE_H_
