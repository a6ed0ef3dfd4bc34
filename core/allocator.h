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

// A layer profile as the allocators read it: the layer demand D ([L]; empty = uniform layers) and,
// optionally, the head demand ([L * Hkv], layer-major) by which reasonalloc's static mode splits
// each layer's budget among its KV heads. Both as the profile store keeps them: normalised (the
// head demand to mean 1 within each layer); the engines do not normalise again, and robustify's
// +1e-6 makes the split differ slightly for unnormalised values.
struct ProfileDemand {
  ProfileDemand() = default;
  // Implicit: a layer demand alone is a profile without head demand.
  ProfileDemand(std::vector<double> layer_demand)  // NOLINT(google-explicit-constructor)
      : layers(std::move(layer_demand)) {}
  ProfileDemand(std::vector<double> layer_demand, std::vector<double> head_demand)
      : layers(std::move(layer_demand)), heads(std::move(head_demand)) {}
  std::vector<double> layers;
  std::vector<double> heads;
};

struct AllocationInputs {
  const SessionConfig* config = nullptr;
  std::span<const int32_t> lengths;            // [L * Hkv] live tokens per head
  std::span<const std::vector<float>> scores;  // [L * Hkv] candidate scores per head
  std::span<const double> layer_demand;        // [L] profile demand D; empty = uniform layers
  std::span<const double> head_demand;         // [L * Hkv] profile head demand; static mode only
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

// Whether the configuration splits each layer's budget among its heads by the profile's head
// demand (reasonalloc static): no scores are needed for the budgets, only the heads' lengths.
bool UsesHeadProfile(const SessionConfig& config);
// Checks a profile against the configuration before any event: the layer demand through
// LayerBudgets and, where UsesHeadProfile, a head demand of L · Hkv finite non-negative entries
// (FailedPrecondition naming allocator.profile's head_demand otherwise).
absl::Status CheckProfileDemand(const SessionConfig& config, const ProfileDemand& demand);
// Budgets ([L * Hkv]) of the static head split: each layer's Hkv · (b_l − window) selectable
// tokens shared by the robustified head demand (head_exponent, floor head_floor of the equal
// share), each head capped at its candidates and the excess handed to the others by demand.
absl::Status HeadBudgetsFromProfile(const SessionConfig& config, std::span<const int32_t> lengths,
                                    std::span<const double> layer_demand,
                                    std::span<const double> head_demand,
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
  // Whether this configuration splits a layer's budget by the profile's head demand (never
  // together with RoutesHeads).
  virtual bool UsesHeadProfile(const AllocatorConfig&) const { return false; }
  // One layer's head budgets (window included) from its pool; called only when RoutesHeads.
  virtual absl::Status RouteHeads(const SessionConfig& config, const LayerPool& pool,
                                  std::span<int32_t> layer) const;

  // Fills `budgets` ([L * Hkv]): the layer budgets for every head; when the configuration
  // routes heads, the pool counts of the scores routed by RouteHeads; with a head profile, the
  // static split (HeadBudgetsFromProfile).
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
// ReasonAlloc's head split of one layer by a demand `r` per head (the routed counts or the
// profile's head demand): robustified with head_exponent, each head at least head_floor of the
// equal share, then RouteLayer.
absl::Status SplitLayerByDemand(const AllocatorConfig& allocator, std::span<const double> r,
                                int64_t total, std::span<const int64_t> candidates, int window,
                                std::span<int32_t> budgets);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_ALLOCATOR_H_
