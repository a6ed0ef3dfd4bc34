// ReasonAlloc (docs/algorithms.md §3.4): layer budgets from the model's layer profile (the
// robustified demand wave), then routing inside each layer toward the heads holding many of the
// layer's best-scored tokens. The mode turns either level off, or (static) replaces the routing by
// the profile's measured head demand.
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/allocators/allocators.h"
#include "core/budget_math.h"

namespace reasonalloc {
namespace {

bool LayerLevel(const AllocatorConfig& a) {
  return a.reasonalloc_mode == ReasonAllocMode::kLayer ||
         a.reasonalloc_mode == ReasonAllocMode::kFull ||
         a.reasonalloc_mode == ReasonAllocMode::kStatic;
}

class ReasonAllocAllocator final : public Allocator {
 public:
  bool UsesLayerProfile(const AllocatorConfig& a) const override { return LayerLevel(a); }

  bool RoutesHeads(const AllocatorConfig& a) const override {
    return a.reasonalloc_mode == ReasonAllocMode::kHead ||
           a.reasonalloc_mode == ReasonAllocMode::kFull;
  }

  absl::StatusOr<std::vector<int64_t>> LayerCaps(
      const SessionConfig& c, std::span<const double> layer_demand) const override {
    if (layer_demand.empty() || !LayerLevel(c.allocator)) {
      return Allocator::LayerCaps(c, layer_demand);  // uniform layers
    }
    const int L = c.model.num_layers;
    if (static_cast<int>(layer_demand.size()) != L) {
      return absl::FailedPreconditionError(
          absl::StrCat("the layer profile has ", layer_demand.size(),
                       " layers; the session's model.num_layers is ", L));
    }
    const int64_t base = c.budget.budget - c.budget.window;
    auto caps = Robustify(layer_demand, L * base, c.allocator.layer_exponent,
                          c.allocator.clip_low * static_cast<double>(base),
                          c.allocator.clip_high * static_cast<double>(base));
    if (!caps.ok()) return caps.status();
    ApplySelectableFloor(*caps);
    return caps;
  }

  bool UsesHeadProfile(const AllocatorConfig& a) const override {
    return a.reasonalloc_mode == ReasonAllocMode::kStatic;
  }

  // Route toward the heads holding many of the layer's tokens at or above tau, the total-th
  // largest score (every candidate when the layer has no more than total).
  absl::Status RouteHeads(const SessionConfig& c, const LayerPool& pool,
                          std::span<int32_t> layer) const override {
    std::vector<double> r(layer.size());
    for (size_t h = 0; h < r.size(); ++h) {
      r[h] = static_cast<double>(pool.greater[h] + pool.equal[h]);
    }
    return SplitLayerByDemand(c.allocator, r, pool.total, pool.candidates, c.budget.window, layer);
  }
};

}  // namespace

std::unique_ptr<Allocator> MakeReasonAllocAllocator() {
  return std::make_unique<ReasonAllocAllocator>();
}

}  // namespace reasonalloc
