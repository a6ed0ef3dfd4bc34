// ReasonAlloc (docs/algorithms.md §3.4): layer budgets from the model's layer profile (the
// robustified demand wave), then routing inside each layer toward the heads holding many of the
// layer's best-scored tokens. The mode turns either level off.
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/allocators/allocators.h"
#include "core/budget_math.h"

namespace reasonalloc {
namespace {

bool LayerLevel(const AllocatorConfig& a) {
  return a.reasonalloc_mode == ReasonAllocMode::kLayer ||
         a.reasonalloc_mode == ReasonAllocMode::kFull;
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

  // Route toward the heads holding many of the layer's tokens at or above tau, the total-th
  // largest score (every candidate when the layer has no more than total).
  absl::Status RouteHeads(const SessionConfig& c, const LayerPool& pool,
                          std::span<int32_t> layer) const override {
    const AllocatorConfig& ac = c.allocator;
    const size_t heads = layer.size();
    const int64_t cap = pool.total / static_cast<int64_t>(heads);
    std::vector<double> r(heads), w(heads);
    for (size_t h = 0; h < heads; ++h) {
      r[h] = static_cast<double>(pool.greater[h] + pool.equal[h]);
      w[h] = std::pow(r[h] + 1e-6, ac.head_exponent);
    }
    auto shares =
        Robustify(r, pool.total, ac.head_exponent, ac.head_floor * static_cast<double>(cap),
                  static_cast<double>(pool.total));
    if (!shares.ok()) return shares.status();
    const std::vector<double> x(shares->begin(), shares->end());
    RouteLayer(x, pool.total, pool.candidates, w, c.budget.window, layer);
    return absl::OkStatus();
  }
};

}  // namespace

std::unique_ptr<Allocator> MakeReasonAllocAllocator() {
  return std::make_unique<ReasonAllocAllocator>();
}

}  // namespace reasonalloc
