#include "core/allocator.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "absl/strings/str_cat.h"
#include "core/budget_math.h"

namespace reasonalloc {
namespace {

int64_t Candidates(int32_t n, int window) { return std::max<int64_t>(0, int64_t{n} - window); }

size_t At(int64_t i) { return static_cast<size_t>(i); }

// Same budget for every head of a layer.
void FillLayers(const std::vector<int32_t>& layer, int heads, std::span<int32_t> budgets) {
  for (size_t l = 0; l < layer.size(); ++l) {
    for (int h = 0; h < heads; ++h) budgets[l * At(heads) + At(h)] = layer[l];
  }
}

// One layer: `total` selectable tokens shared by the heads following the real shares `x`, with the
// selectable floor; then each head is capped at its candidates and the excess handed on by
// `weights`.
void RouteLayer(std::span<const double> x, int64_t total, std::span<const int64_t> candidates,
                std::span<const double> weights, int window, std::span<int32_t> budgets) {
  std::vector<int64_t> caps = RoundPreservingSum(x, total);
  ApplySelectableFloor(caps);
  CapAndRedistribute(caps, candidates, weights);
  for (size_t h = 0; h < caps.size(); ++h) budgets[h] = static_cast<int32_t>(window + caps[h]);
}

class UniformAllocator final : public Allocator {
 public:
  absl::Status Allocate(const AllocationInputs& in, std::span<int32_t> budgets) const override {
    std::fill(budgets.begin(), budgets.end(), in.config->budget.budget);
    return absl::OkStatus();
  }
};

class PyramidAllocator final : public Allocator {
 public:
  absl::Status Allocate(const AllocationInputs& in, std::span<int32_t> budgets) const override {
    auto layers = LayerBudgets(*in.config, {});
    if (!layers.ok()) return layers.status();
    FillLayers(*layers, in.config->model.num_kv_heads, budgets);
    return absl::OkStatus();
  }
};

// Both head-wise allocators count each layer's pool (CountLayerPool) and route from the counts
// (RouteFromPoolCounts), the same path the CUDA backend takes with counts made on the GPU.
class PoolCountAllocator final : public Allocator {
 public:
  absl::Status Allocate(const AllocationInputs& in, std::span<int32_t> budgets) const override {
    const SessionConfig& c = *in.config;
    if (!UsesPoolCounts(c)) {
      // reasonalloc without head routing: the layer wave (or uniform layers) only.
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
};

}  // namespace

absl::StatusOr<std::vector<int32_t>> LayerBudgets(const SessionConfig& c,
                                                  std::span<const double> layer_demand) {
  const int L = c.model.num_layers;
  const int window = c.budget.window;
  const int64_t base = c.budget.budget - window;
  std::vector<int64_t> caps(At(L), base);
  if (c.allocator.name == "pyramid") {
    // kvpress's real-valued form: Σ_l x_l = L·base exactly (KVCache-Factory's integer steps
    // overshoot).
    const double b = static_cast<double>(base);
    const double min_n = b / c.allocator.pyramid_beta;
    const double max_n = 2 * b - min_n;
    std::vector<double> x(At(L), b);
    if (L > 1) {
      for (int l = 0; l < L; ++l) x[At(l)] = max_n - l * (max_n - min_n) / (L - 1);
    }
    caps = RoundPreservingSum(x, L * base);
    ApplySelectableFloor(caps);
  } else if (c.allocator.name == "reasonalloc" && !layer_demand.empty() &&
             (c.allocator.reasonalloc_mode == ReasonAllocMode::kLayer ||
              c.allocator.reasonalloc_mode == ReasonAllocMode::kFull)) {
    if (static_cast<int>(layer_demand.size()) != L) {
      return absl::FailedPreconditionError(
          absl::StrCat("the layer profile has ", layer_demand.size(),
                       " layers; the session's model.num_layers is ", L));
    }
    auto r = Robustify(layer_demand, L * base, c.allocator.layer_exponent,
                       c.allocator.clip_low * static_cast<double>(base),
                       c.allocator.clip_high * static_cast<double>(base));
    if (!r.ok()) return r.status();
    caps = *std::move(r);
    ApplySelectableFloor(caps);
  }
  std::vector<int32_t> out(At(L));
  for (int l = 0; l < L; ++l) out[At(l)] = static_cast<int32_t>(window + caps[At(l)]);
  return out;
}

bool UsesPoolCounts(const SessionConfig& c) {
  return c.allocator.name == "adakv" || (c.allocator.name == "reasonalloc" &&
                                         (c.allocator.reasonalloc_mode == ReasonAllocMode::kHead ||
                                          c.allocator.reasonalloc_mode == ReasonAllocMode::kFull));
}

absl::StatusOr<std::vector<int64_t>> PoolSizes(const SessionConfig& c,
                                               std::span<const double> layer_demand) {
  const int64_t heads = c.model.num_kv_heads;
  std::vector<int64_t> k(At(c.model.num_layers), heads * (c.budget.budget - c.budget.window));
  if (c.allocator.name == "reasonalloc") {
    auto layers = LayerBudgets(c, layer_demand);
    if (!layers.ok()) return layers.status();
    for (size_t l = 0; l < k.size(); ++l) k[l] = heads * ((*layers)[l] - c.budget.window);
  }
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
  const AllocatorConfig& ac = c.allocator;
  const int heads = c.model.num_kv_heads;
  const int window = c.budget.window;
  auto k = PoolSizes(c, layer_demand);
  if (!k.ok()) return k.status();
  for (int l = 0; l < c.model.num_layers; ++l) {
    const size_t first = At(l) * At(heads);
    std::span<int32_t> layer = budgets.subspan(first, At(heads));
    const int64_t total = (*k)[At(l)];
    const int64_t cap = total / heads;
    std::vector<int64_t> candidates(At(heads));
    int64_t pool = 0;
    for (int h = 0; h < heads; ++h) {
      candidates[At(h)] = Candidates(lengths[first + At(h)], window);
      pool += candidates[At(h)];
    }
    if (ac.name == "adakv") {
      // AdaKV (§3.3): the heads compete in one pool of candidate scores; each head gets its share
      // of the pool's top `total` picks (ties to the lower head, then the lower token), softened by
      // the floor a.
      if (pool <= total) {
        // Every candidate fits: each head keeps all it has.
        for (int h = 0; h < heads; ++h) {
          layer[At(h)] = static_cast<int32_t>(window + candidates[At(h)]);
        }
        continue;
      }
      const double a = ac.adakv_floor;
      int64_t ties_left = total;
      for (int h = 0; h < heads; ++h) ties_left -= greater[first + At(h)];
      std::vector<double> x(At(heads), a * static_cast<double>(cap));
      for (int h = 0; h < heads; ++h) {
        const int64_t ties = std::clamp<int64_t>(ties_left, 0, equal[first + At(h)]);
        ties_left -= ties;
        x[At(h)] += (1 - a) * static_cast<double>(greater[first + At(h)] + ties);
      }
      RouteLayer(x, total, candidates, x, window, layer);
      continue;
    }
    // ReasonAlloc (§3.4): route toward the heads holding many of the layer's tokens at or above
    // tau, the total-th largest score (every candidate when the layer has no more than total).
    std::vector<double> r(At(heads)), w(At(heads));
    for (int h = 0; h < heads; ++h) {
      r[At(h)] = static_cast<double>(greater[first + At(h)] + equal[first + At(h)]);
      w[At(h)] = std::pow(r[At(h)] + 1e-6, ac.head_exponent);
    }
    auto shares = Robustify(r, total, ac.head_exponent, ac.head_floor * static_cast<double>(cap),
                            static_cast<double>(total));
    if (!shares.ok()) return shares.status();
    const std::vector<double> x(shares->begin(), shares->end());
    RouteLayer(x, total, candidates, w, window, layer);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Allocator>> MakeAllocator(const AllocatorConfig& config) {
  if (config.name == "uniform") return std::make_unique<UniformAllocator>();
  if (config.name == "pyramid") return std::make_unique<PyramidAllocator>();
  if (config.name == "adakv" || config.name == "reasonalloc") {
    return std::make_unique<PoolCountAllocator>();
  }
  return absl::UnimplementedError(
      absl::StrCat("allocator.name \"", config.name, "\" is not implemented in this build yet"));
}

}  // namespace reasonalloc
