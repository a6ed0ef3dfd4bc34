// Allocators decide how many tokens each (layer, KV head) keeps at a compression event
// (docs/algorithms.md §3).
//
// Invariant: every budget is at least window + 1 before saturation, and Σ budgets = L·Hkv·B
// exactly, except where head-wise allocators (adakv, reasonalloc head routing) cap a head at the
// tokens it has and no other head of the layer can take the rest. Uniform, pyramid and layer-only
// budgets do not depend on the tokens present: a head holding fewer simply keeps everything.
#ifndef REASONALLOC_CORE_ALLOCATOR_H_
#define REASONALLOC_CORE_ALLOCATOR_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/session_config.h"

namespace reasonalloc {

struct AllocationInputs {
  const SessionConfig* config = nullptr;
  std::span<const int32_t> lengths;            // [L * Hkv] live tokens per head
  std::span<const std::vector<float>> scores;  // [L * Hkv] candidate scores per head
  std::span<const double> layer_demand;        // [L] profile demand D; empty = uniform layers
};

// Per-layer budgets b_l (window included) before head routing: uniform and adakv B; pyramid its
// closed form (§3.2); reasonalloc the robustified wave (§3.4) when a demand profile is given and
// the mode uses layers, else B. Σ_l (b_l − window) = L·(B − window) exactly.
absl::StatusOr<std::vector<int32_t>> LayerBudgets(const SessionConfig& config,
                                                  std::span<const double> layer_demand);

// Head-wise allocators (adakv, reasonalloc with head routing) see the scores only through counts
// over each layer's pooled candidates: with τ the k-th largest score of the layer's pool (k =
// PoolSizes()[l], the layer's selectable total), greater[h] counts head h's candidates above τ and
// equal[h] those equal to τ; when the pool holds at most k candidates, greater[h] is all of head
// h's candidates and equal[h] is 0. The CPU counts from its scores (CountLayerPool), the CUDA
// backend on the GPU; both route through RouteFromPoolCounts, so equal counts give equal budgets.
bool UsesPoolCounts(const SessionConfig& config);
// k per layer ([L]); only meaningful when UsesPoolCounts.
absl::StatusOr<std::vector<int64_t>> PoolSizes(const SessionConfig& config,
                                               std::span<const double> layer_demand);
// Counts one layer: `scores` holds the layer's Hkv heads' candidate scores.
void CountLayerPool(std::span<const std::vector<float>> scores, int64_t k, int64_t* greater,
                    int64_t* equal);
// Budgets ([L * Hkv]) from the counts ([L * Hkv] each).
absl::Status RouteFromPoolCounts(const SessionConfig& config, std::span<const int32_t> lengths,
                                 std::span<const double> layer_demand,
                                 std::span<const int64_t> greater, std::span<const int64_t> equal,
                                 std::span<int32_t> budgets);

class Allocator {
 public:
  virtual ~Allocator() = default;
  // Fills `budgets` ([L * Hkv]).
  virtual absl::Status Allocate(const AllocationInputs& in, std::span<int32_t> budgets) const = 0;
};

absl::StatusOr<std::unique_ptr<Allocator>> MakeAllocator(const AllocatorConfig& config);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_ALLOCATOR_H_
