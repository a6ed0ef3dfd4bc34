// Decoding a batch of prompts with the model, against either KV backend: the full cache in process
// memory, or managed sidecar sessions over host shared-memory arenas (one session per sequence).
//
// The sidecar path: each step's K, V and queries go into the session's arenas (SessionView); when
// any head's region is full (budget + Δ rows), the worker calls Compress for the step before, and
// the sidecar compacts the kept rows in place. Attention always runs over each head's live rows,
// and rotary positions are the tokens' original positions (never re-rotated after eviction).
#ifndef REASONALLOC_WORKER_DRIVER_H_
#define REASONALLOC_WORKER_DRIVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/client.h"
#include "client/session_view.h"
#include "core/policy.h"
#include "worker/model.h"

namespace reasonalloc::worker {

// A KV backend for Run: the model's KvStore plus what happens around each step.
class KvBackend : public KvStore {
 public:
  // Before sequence `slot` feeds step `step` (its position): make room (the sidecar compresses).
  virtual absl::Status BeforeStep(int slot, int64_t step) = 0;
  // After the step: keys/values/queries of this sequence, [L, Hkv, d] and [L, Hq, d].
  virtual absl::Status Commit(int slot, int64_t step, const float* keys, const float* values,
                              const float* queries) = 0;
  // KV bytes held by the sequence now (fp32 K and V rows).
  virtual int64_t Bytes(int slot) const = 0;
};

class FullCacheBackend : public KvBackend {
 public:
  FullCacheBackend(const ModelConfig& config, int batch) : cache_(config, batch) {}
  int Length(int b, int l, int h) const override { return cache_.Length(b, l, h); }
  float* KeyRow(int b, int l, int h, int row) override { return cache_.KeyRow(b, l, h, row); }
  float* ValueRow(int b, int l, int h, int row) override { return cache_.ValueRow(b, l, h, row); }
  absl::Status BeforeStep(int, int64_t) override { return absl::OkStatus(); }
  absl::Status Commit(int slot, int64_t, const float*, const float*, const float*) override {
    cache_.Commit(slot);
    return absl::OkStatus();
  }
  int64_t Bytes(int slot) const override { return cache_.bytes(slot); }

 private:
  FullCache cache_;
};

// The eviction policy of a sidecar session.
struct Policy {
  ScorerKind scorer = ScorerKind::kRkv;
  AllocatorKind allocator = AllocatorKind::kUniform;
  ReasonAllocMode reasonalloc_mode = ReasonAllocMode::kFull;  // reasonalloc only
  std::string profile;  // layer profile name; empty = the model name
  int budget = 64;      // tokens per head (mean)
  int buffer = 64;      // Δ: steps between events
  int window = 8;       // α
  int sinks = -1;       // always-kept first tokens; -1 = the scorer's default
  int recent = 0;       // always-kept last tokens; 0 = the window
  double lambda = 0;    // rkv's λ; 0 = the sidecar's default
  std::string scorer_name() const { return std::string(NameOf(scorer)); }
  std::string allocator_name() const { return std::string(NameOf(allocator)); }
  // The reasonalloc mode's name; empty for other allocators.
  std::string mode_name() const;
  // scorer/allocator[-mode], then +sN, +rN, +lX for knobs away from their defaults and @profile
  // for a layer profile other than the model's (the syntax ParsePolicy reads).
  std::string Name() const;
};

// Reads Name()'s syntax, e.g. "rkv/reasonalloc-full+s4+r32+l0.07@mymodel.sensitivity".
absl::StatusOr<Policy> ParsePolicy(absl::string_view text);

absl::StatusOr<v1::CreateSessionRequest> SessionRequest(const ModelConfig& config,
                                                        const std::string& model_name,
                                                        const Policy& policy);

class SidecarBackend : public KvBackend {
 public:
  // Opens one managed host-shm session per sequence, sequence b with policies[b] (closed again by
  // the destructor).
  static absl::StatusOr<std::unique_ptr<SidecarBackend>> Open(Client* client,
                                                              const ModelConfig& config,
                                                              const std::string& model_name,
                                                              const std::vector<Policy>& policies);
  ~SidecarBackend() override;

  // Lease each session asks for; BeforeStep renews it (KeepAlive) when a quarter of it has passed
  // without a Compress.
  static constexpr double kLeaseSeconds = 600;

  int Length(int b, int l, int h) const override { return views_[b]->length(l, h); }
  float* KeyRow(int b, int l, int h, int row) override {
    return views_[b]->key_row<float>(l, h, row);
  }
  float* ValueRow(int b, int l, int h, int row) override {
    return views_[b]->value_row<float>(l, h, row);
  }
  absl::Status BeforeStep(int slot, int64_t step) override;
  absl::Status Commit(int slot, int64_t step, const float* keys, const float* values,
                      const float* queries) override;
  int64_t Bytes(int slot) const override;

  // Per-layer mean budget of sequence `slot` after its last event.
  std::vector<double> LayerBudgets(int slot) const;
  // [L * Hkv] each head's budget of sequence `slot`, averaged over its events (entry l * Hkv + h;
  // all zero before the first event): how head routing shares a layer's budget.
  std::vector<double> HeadBudgets(int slot) const;
  int64_t events() const { return events_; }
  double compress_seconds() const { return compress_seconds_; }
  // The same for sequence `slot` alone.
  int64_t events(int slot) const { return slot_events_[static_cast<size_t>(slot)]; }
  double compress_seconds(int slot) const { return slot_seconds_[static_cast<size_t>(slot)]; }

 private:
  SidecarBackend() = default;
  Client* client_ = nullptr;
  ModelConfig config_;
  std::vector<std::string> ids_;
  std::vector<std::unique_ptr<SessionView>> views_;
  int64_t events_ = 0;
  double compress_seconds_ = 0;
  std::vector<int64_t> slot_events_;
  std::vector<double> slot_seconds_;
  std::vector<std::vector<double>> head_budget_sums_;  // per slot, [L * Hkv] over its events
  std::vector<double> last_contact_;  // Now() of each session's last Compress or KeepAlive
};

struct RunOptions {
  int max_new_tokens = 256;
  float temperature = 0;  // 0 = greedy (ties to the lower token id)
  uint64_t seed = 0;
  bool stop_at_eos = true;
  int32_t eos = -1;
  // Tokens never chosen (e.g. the control tokens, to get a trajectory of a fixed length).
  std::vector<int32_t> suppress;
  // Teacher forcing: forced[b] are the tokens fed after the prompt (the first max_new_tokens − 1
  // of them are used); the model's own choices are still reported. Empty (or forced[b] empty):
  // sequence b feeds its own choices.
  std::vector<std::vector<int32_t>> forced;
  // Called with the logits that predict generated token `index` of sequence `b`; the calls of one
  // step run in parallel on the shared pool, so the callback must be thread-safe across sequences.
  std::function<void(int b, int index, const float* logits)> on_logits;
  // Called after each committed step of sequence `b` (position `step`) with its queries
  // [L, Hq, d].
  std::function<absl::Status(int b, int64_t step, const float* queries)> after_step;
};

struct RunResult {
  std::vector<std::vector<int32_t>> generated;  // per sequence, the model's own choices
  std::vector<int64_t> peak_bytes;              // KV bytes held, the maximum over the run
  std::vector<int64_t> final_bytes;
  double seconds = 0;
  int64_t tokens = 0;  // sequence-steps run (prompt and generated)
};

absl::StatusOr<RunResult> Run(const Model& model, KvBackend* kv,
                              const std::vector<std::vector<int32_t>>& prompts,
                              const RunOptions& options);

// Greedy or temperature sampling over `vocab` logits, never choosing a token in `suppress`.
int32_t Sample(const float* logits, int vocab, float temperature, std::mt19937_64* rng,
               const std::vector<int32_t>& suppress = {});

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_DRIVER_H_
