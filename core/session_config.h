// The configuration of one eviction session: model geometry, budgets, scorer and allocator knobs.
//
// Defaults are those of docs/algorithms.md §5. Validate() is the single place where a configuration
// is judged; every error message names the field as the v1 API spells it (e.g.
// "model.num_kv_heads") and the bad value. Scorer and allocator names are parsed before, where they
// enter the process (core/policy.h).
#ifndef REASONALLOC_CORE_SESSION_CONFIG_H_
#define REASONALLOC_CORE_SESSION_CONFIG_H_

#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "core/dtype.h"
#include "core/policy.h"

namespace reasonalloc {

struct ModelGeometry {
  std::string name;
  int num_layers = 0;    // L
  int num_q_heads = 0;   // Hq
  int num_kv_heads = 0;  // Hkv
  int head_dim = 0;      // d
  DType dtype = DType::kFloat16;
  int max_context = 0;

  int group_size() const { return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0; }
  int64_t num_heads_total() const { return int64_t{num_layers} * num_kv_heads; }
};

struct BudgetConfig {
  int budget = 512;  // B, window included
  int buffer = 128;  // Δ
  int window = 8;    // α
  // The first `sinks` positions of every head are always kept (inside the head's budget). Unset:
  // the scorer's default, kDefaultStreamingSinks for streaming and 0 for the others.
  std::optional<int> sinks;
  // The last `recent` positions of every head are always kept, the scorer choosing among the
  // rest; 0 or anything up to `window` means the window alone (the scorers' own guarantee).
  int recent = 0;
};

enum class PoolKind { kMax, kAvg };
// kMax / kMean reduce the group's logits before the softmax (R-KV); kMeanScores averages the
// pooled per-query-head scores after it (kvpress).
enum class GqaReduce { kMax, kMean, kMeanScores };

struct ScorerConfig {
  ScorerKind kind = ScorerKind::kSnapKv;
  int pool_kernel = 7;
  PoolKind pool_kind = PoolKind::kMax;
  GqaReduce gqa_reduce = GqaReduce::kMax;
  double lambda = 0.1;
  double threshold = 0.5;
  // Softmax over all keys (causal inside the window) instead of over the candidates only.
  bool softmax_all_keys = false;
};

struct AllocatorConfig {
  AllocatorKind kind = AllocatorKind::kUniform;
  double pyramid_beta = 20.0;
  double adakv_floor = 0.2;
  ReasonAllocMode reasonalloc_mode = ReasonAllocMode::kFull;
  double layer_exponent = 0.5;
  double head_exponent = 0.5;
  double head_floor = 0.25;
  double clip_low = 0.25;
  double clip_high = 2.0;
  std::string profile;
};

struct SessionConfig {
  ModelGeometry model;
  BudgetConfig budget;
  ScorerConfig scorer;
  AllocatorConfig allocator;
  bool managed = true;  // managed: the sidecar holds K and V; advisory: decisions only
};

inline constexpr int kDefaultStreamingSinks = 4;
// The protected prefix and suffix of every head as the engine applies them (defaults resolved).
int EffectiveSinks(const SessionConfig& config);
int EffectiveRecent(const SessionConfig& config);

// Hard limits that keep sizes far from integer overflow; real models sit well inside them.
inline constexpr int kMaxLayers = 1024;
inline constexpr int kMaxHeads = 1024;
inline constexpr int kMaxHeadDim = 1024;
inline constexpr int kMaxContext = 1 << 24;  // token positions stay exact in fp32
inline constexpr int kMaxWindow = 1024;
inline constexpr int kMaxPoolKernel = 63;

absl::Status ValidateGeometry(const ModelGeometry& model);
absl::Status ValidateBudget(const BudgetConfig& budget, const ModelGeometry& model);
// The checks of budget.budget for a value `budget` that replaces it, the errors naming `field`
// (UpdateBudget's request names it "budget").
absl::Status CheckBudgetValue(int budget, const BudgetConfig& current, const ModelGeometry& model,
                              absl::string_view field);
absl::Status ValidateSessionConfig(const SessionConfig& config);

// Bytes a session reserves against the server's arena pool: the shared-memory objects a
// MEMORY_KIND_HOST_SHM session of this configuration creates, each rounded up to whole pages (what
// /dev/shm charges): the KV arena, the query-window ring and the H2O accumulator (managed mode;
// h2o scorer) and the result block. Other sessions reserve the same, so that a pool sized for
// shared-memory sessions bounds them all.
struct ArenaBytes {
  uint64_t kv = 0;
  uint64_t query_ring = 0;
  uint64_t accumulator = 0;
  uint64_t result = 0;
  uint64_t total() const { return kv + query_ring + accumulator + result; }
};
// Largest number of rows one head may hold between events.
int64_t MaxHeadCapacity(const SessionConfig& config);
ArenaBytes ComputeArenaBytes(const SessionConfig& config);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_SESSION_CONFIG_H_
