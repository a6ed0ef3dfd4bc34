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

// One layer's pool, as a head-routing allocator sees it: `total` selectable tokens to share among
// the layer's heads; per head its candidates (live tokens past the window) and the counts of
// CountLayerPool.
struct LayerPool {
  int64_t total = 0;
  std::span<const int64_t> candidates;
  std::span<const int64_t> greater;
  std::span<const int64_t> equal;
};

// An allocation policy (one class per policy, in core/allocators/, each with its row in
// core/policy.cc). Stateless: the registry holds one instance of each (AllocatorOf).
class Allocator {
 public:
  virtual ~Allocator() = default;
  // Selectable tokens per layer (budget − window), Σ = L·(B − window). The default: uniform.
  virtual absl::StatusOr<std::vector<int64_t>> LayerCaps(
      const SessionConfig& config, std::span<const double> layer_demand) const;
  // Whether this configuration reads a layer profile.
  virtual bool UsesLayerProfile(const AllocatorConfig&) const { return false; }
  // Whether this configuration routes budget between a layer's heads by the pool counts.
  virtual bool RoutesHeads(const AllocatorConfig&) const { return false; }
  // One layer's head budgets (window included) from its pool; called only when RoutesHeads.
  virtual absl::Status RouteHeads(const SessionConfig& config, const LayerPool& pool,
                                  std::span<int32_t> layer) const;

  // Fills `budgets` ([L * Hkv]): the layer budgets for every head, or, when the configuration
  // routes heads, the pool counts of the scores routed by RouteHeads.
  absl::Status Allocate(const AllocationInputs& in, std::span<int32_t> budgets) const;
};

// The registry's instance for config.kind (never fails: kinds are parsed at the edge); kept as a
// factory for callers that hold allocators by value.
absl::StatusOr<std::unique_ptr<Allocator>> MakeAllocator(const AllocatorConfig& config);

// Shared by the allocators: one layer's `total` selectable tokens split by the real shares `x`
// (rounded preserving the sum, with the selectable floor), each head capped at its candidates and
// the excess handed on by `weights`.
void RouteLayer(std::span<const double> x, int64_t total, std::span<const int64_t> candidates,
                std::span<const double> weights, int window, std::span<int32_t> budgets);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_ALLOCATOR_H_
