#include "core/allocator.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "absl/strings/str_cat.h"
#include "core/budget_math.h"
#include "core/check.h"
#include "core/policy.h"

namespace reasonalloc {
namespace {

size_t At(int64_t i) { return static_cast<size_t>(i); }

// Same budget for every head of a layer.
void FillLayers(const std::vector<int32_t>& layer, int heads, std::span<int32_t> budgets) {
  for (size_t l = 0; l < layer.size(); ++l) {
    for (int h = 0; h < heads; ++h) budgets[l * At(heads) + At(h)] = layer[l];
  }
}

}  // namespace

void RouteLayer(std::span<const double> x, int64_t total, std::span<const int64_t> candidates,
                std::span<const double> weights, int window, std::span<int32_t> budgets) {
  std::vector<int64_t> caps = RoundPreservingSum(x, total);
  ApplySelectableFloor(caps);
  CapAndRedistribute(caps, candidates, weights);
  for (size_t h = 0; h < caps.size(); ++h) budgets[h] = static_cast<int32_t>(window + caps[h]);
}

absl::Status SplitLayerByDemand(const AllocatorConfig& ac, std::span<const double> r, int64_t total,
                                std::span<const int64_t> candidates, int window,
                                std::span<int32_t> budgets) {
  const size_t heads = budgets.size();
  const int64_t cap = total / static_cast<int64_t>(heads);
  std::vector<double> w(heads);
  for (size_t h = 0; h < heads; ++h) w[h] = std::pow(r[h] + 1e-6, ac.head_exponent);
  auto shares = Robustify(r, total, ac.head_exponent, ac.head_floor * static_cast<double>(cap),
                          static_cast<double>(total));
  if (!shares.ok()) return shares.status();
  const std::vector<double> x(shares->begin(), shares->end());
  RouteLayer(x, total, candidates, w, window, budgets);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> Allocator::LayerCaps(const SessionConfig& c,
                                                          std::span<const double>) const {
  return std::vector<int64_t>(At(c.model.num_layers), c.budget.budget - c.budget.window);
}

absl::Status Allocator::RouteHeads(const SessionConfig& c, const LayerPool& pool,
                                   std::span<int32_t> layer) const {
  // Only reached through RouteFromPoolCounts, which the engines call when RoutesHeads.
  REASONALLOC_DCHECK(RoutesHeads(c.allocator));
  const int64_t share = pool.total / static_cast<int64_t>(std::max<size_t>(1, layer.size()));
  std::fill(layer.begin(), layer.end(), static_cast<int32_t>(c.budget.window + share));
  return absl::OkStatus();
}

absl::Status Allocator::Allocate(const AllocationInputs& in, std::span<int32_t> budgets) const {
  const SessionConfig& c = *in.config;
  if (UsesHeadProfile(c.allocator)) {
    return HeadBudgetsFromProfile(c, in.lengths, in.layer_demand, in.head_demand, budgets);
  }
  if (!RoutesHeads(c.allocator)) {
    auto layers = LayerBudgets(c, in.layer_demand);
    if (!layers.ok()) return layers.status();
    FillLayers(*layers, c.model.num_kv_heads, budgets);
    return absl::OkStatus();
  }
  auto k = PoolSizes(c, in.layer_demand);
  if (!k.ok()) return k.status();
  const size_t heads = At(c.model.num_kv_heads);
  std::vector<int64_t> greater(in.scores.size()), equal(in.scores.size());
  for (size_t l = 0; l < k->size(); ++l) {
    CountLayerPool(in.scores.subspan(l * heads, heads), (*k)[l], greater.data() + l * heads,
                   equal.data() + l * heads);
  }
  return RouteFromPoolCounts(c, in.lengths, in.layer_demand, greater, equal, budgets);
}

absl::StatusOr<std::vector<int32_t>> LayerBudgets(const SessionConfig& c,
                                                  std::span<const double> layer_demand) {
  const int L = c.model.num_layers;
  auto caps = AllocatorOf(c.allocator.kind).LayerCaps(c, layer_demand);
  if (!caps.ok()) return caps.status();
  std::vector<int32_t> out(At(L));
  for (int l = 0; l < L; ++l) out[At(l)] = static_cast<int32_t>(c.budget.window + (*caps)[At(l)]);
  return out;
}

bool UsesPoolCounts(const SessionConfig& c) {
  return AllocatorOf(c.allocator.kind).RoutesHeads(c.allocator);
}

bool UsesHeadProfile(const SessionConfig& c) {
  return AllocatorOf(c.allocator.kind).UsesHeadProfile(c.allocator);
}

absl::Status CheckProfileDemand(const SessionConfig& c, const ProfileDemand& demand) {
  if (auto layers = LayerBudgets(c, demand.layers); !layers.ok()) return layers.status();
  if (!UsesHeadProfile(c)) return absl::OkStatus();
  const int64_t want = c.model.num_heads_total();
  const std::string profile = absl::StrCat(
      "layer profile \"", c.allocator.profile.empty() ? c.model.name : c.allocator.profile, "\"");
  if (static_cast<int64_t>(demand.heads.size()) != want) {
    return absl::FailedPreconditionError(absl::StrCat(
        "allocator.reasonalloc_mode static needs the layer profile's head_demand (num_layers * "
        "num_kv_heads = ",
        want, " entries); ", profile, " has ", demand.heads.size()));
  }
  for (size_t i = 0; i < demand.heads.size(); ++i) {
    if (!std::isfinite(demand.heads[i]) || demand.heads[i] < 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          profile, ": head_demand[", i, "] = ", demand.heads[i], " is not finite and >= 0"));
    }
  }
  return absl::OkStatus();
}

absl::Status HeadBudgetsFromProfile(const SessionConfig& c, std::span<const int32_t> lengths,
                                    std::span<const double> layer_demand,
                                    std::span<const double> head_demand,
                                    std::span<int32_t> budgets) {
  const size_t heads = At(c.model.num_kv_heads);
  const int window = c.budget.window;
  const size_t all = At(c.model.num_heads_total());
  if (lengths.size() != all || budgets.size() != all) {
    return absl::InvalidArgumentError(absl::StrCat("lengths has ", lengths.size(),
                                                   " entries and budgets ", budgets.size(),
                                                   "; num_layers * num_kv_heads is ", all));
  }
  if (head_demand.size() != all) {
    return absl::FailedPreconditionError(absl::StrCat("the profile's head_demand has ",
                                                      head_demand.size(),
                                                      " entries; the session has ", all, " heads"));
  }
  auto k = PoolSizes(c, layer_demand);
  if (!k.ok()) return k.status();
  std::vector<int64_t> candidates(heads);
  for (size_t l = 0; l < k->size(); ++l) {
    const size_t first = l * heads;
    for (size_t h = 0; h < heads; ++h) {
      candidates[h] = std::max<int64_t>(0, int64_t{lengths[first + h]} - window);
    }
    if (auto s = SplitLayerByDemand(c.allocator, head_demand.subspan(first, heads), (*k)[l],
                                    candidates, window, budgets.subspan(first, heads));
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> PoolSizes(const SessionConfig& c,
                                               std::span<const double> layer_demand) {
  // Each layer's pool is what its heads may select in all: Hkv · (b_l − window).
  const int64_t heads = c.model.num_kv_heads;
  auto layers = LayerBudgets(c, layer_demand);
  if (!layers.ok()) return layers.status();
  std::vector<int64_t> k(layers->size());
  for (size_t l = 0; l < k.size(); ++l) k[l] = heads * ((*layers)[l] - c.budget.window);
  return k;
}

void CountLayerPool(std::span<const std::vector<float>> scores, int64_t k, int64_t* greater,
                    int64_t* equal) {
  std::vector<float> pool;
  for (const auto& s : scores) pool.insert(pool.end(), s.begin(), s.end());
  if (static_cast<int64_t>(pool.size()) <= k) {
    for (size_t h = 0; h < scores.size(); ++h) {
      greater[h] = static_cast<int64_t>(scores[h].size());
      equal[h] = 0;
    }
    return;
  }
  // tau: the k-th largest score of the layer.
  std::nth_element(pool.begin(), pool.begin() + (k - 1), pool.end(), std::greater<float>());
  const float tau = pool[At(k - 1)];
  for (size_t h = 0; h < scores.size(); ++h) {
    greater[h] =
        std::count_if(scores[h].begin(), scores[h].end(), [tau](float v) { return v > tau; });
    equal[h] = std::count(scores[h].begin(), scores[h].end(), tau);
  }
}

absl::Status RouteFromPoolCounts(const SessionConfig& c, std::span<const int32_t> lengths,
                                 std::span<const double> layer_demand,
                                 std::span<const int64_t> greater, std::span<const int64_t> equal,
                                 std::span<int32_t> budgets) {
  const Allocator& allocator = AllocatorOf(c.allocator.kind);
  const int heads = c.model.num_kv_heads;
  const int window = c.budget.window;
  auto k = PoolSizes(c, layer_demand);
  if (!k.ok()) return k.status();
  std::vector<int64_t> candidates(At(heads));
  for (int l = 0; l < c.model.num_layers; ++l) {
    const size_t first = At(l) * At(heads);
    for (int h = 0; h < heads; ++h) {
      candidates[At(h)] = std::max<int64_t>(0, int64_t{lengths[first + At(h)]} - window);
    }
    const LayerPool pool{.total = (*k)[At(l)],
                         .candidates = candidates,
                         .greater = greater.subspan(first, At(heads)),
                         .equal = equal.subspan(first, At(heads))};
    if (auto s = allocator.RouteHeads(c, pool, budgets.subspan(first, At(heads))); !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Allocator>> MakeAllocator(const AllocatorConfig& config) {
  return PolicyOf(config.kind).make();
}

}  // namespace reasonalloc
