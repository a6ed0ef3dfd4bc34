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

// AdaKV (§3.3): the heads of a layer compete in one pool of candidate scores; each head gets its
// share of the pool's top picks, softened by the floor a.
class AdaKvAllocator final : public Allocator {
 public:
  absl::Status Allocate(const AllocationInputs& in, std::span<int32_t> budgets) const override {
    const SessionConfig& c = *in.config;
    const int heads = c.model.num_kv_heads;
    const int window = c.budget.window;
    const double a = c.allocator.adakv_floor;
    const int64_t cap = c.budget.budget - window;
    const int64_t total = heads * cap;
    for (int l = 0; l < c.model.num_layers; ++l) {
      const size_t first = At(l) * At(heads);
      std::span<int32_t> layer = budgets.subspan(first, At(heads));
      std::vector<int64_t> candidates(At(heads));
      std::vector<std::pair<int, int>> pool;  // (head, token)
      for (int h = 0; h < heads; ++h) {
        candidates[At(h)] = Candidates(in.lengths[first + At(h)], window);
        for (int64_t j = 0; j < candidates[At(h)]; ++j) pool.emplace_back(h, static_cast<int>(j));
      }
      if (static_cast<int64_t>(pool.size()) <= total) {
        // Every candidate fits: each head keeps all it has.
        for (int h = 0; h < heads; ++h)
          layer[At(h)] = static_cast<int32_t>(window + candidates[At(h)]);
        continue;
      }
      // Top `total` of the pool; ties to the lower head, then the lower token.
      auto score = [&](const std::pair<int, int>& p) {
        return in.scores[first + At(p.first)][At(p.second)];
      };
      auto better = [&](const std::pair<int, int>& p, const std::pair<int, int>& q) {
        const float sp = score(p), sq = score(q);
        if (sp != sq) return sp > sq;
        return p < q;
      };
      std::nth_element(pool.begin(), pool.begin() + total, pool.end(), better);
      std::vector<double> x(At(heads), a * static_cast<double>(cap));
      for (int64_t k = 0; k < total; ++k) x[At(pool[At(k)].first)] += 1 - a;
      RouteLayer(x, total, candidates, x, window, layer);
    }
    return absl::OkStatus();
  }
};

// ReasonAlloc (§3.4): the offline layer wave, then online routing toward the heads that hold many
// of the layer's high-utility tokens.
class ReasonAllocAllocator final : public Allocator {
 public:
  absl::Status Allocate(const AllocationInputs& in, std::span<int32_t> budgets) const override {
    const SessionConfig& c = *in.config;
    const AllocatorConfig& ac = c.allocator;
    const int heads = c.model.num_kv_heads;
    const int window = c.budget.window;
    auto layers = LayerBudgets(c, in.layer_demand);
    if (!layers.ok()) return layers.status();
    if (ac.reasonalloc_mode != ReasonAllocMode::kHead &&
        ac.reasonalloc_mode != ReasonAllocMode::kFull) {
      FillLayers(*layers, heads, budgets);
      return absl::OkStatus();
    }
    for (int l = 0; l < c.model.num_layers; ++l) {
      const size_t first = At(l) * At(heads);
      const int64_t cap = (*layers)[At(l)] - window;
      const int64_t total = heads * cap;
      std::vector<float> pool;
      std::vector<int64_t> candidates(At(heads));
      for (int h = 0; h < heads; ++h) {
        const auto& s = in.scores[first + At(h)];
        candidates[At(h)] = static_cast<int64_t>(s.size());
        pool.insert(pool.end(), s.begin(), s.end());
      }
      // tau: the total-th largest score of the layer (−inf when the layer has fewer candidates).
      float tau = -INFINITY;
      if (static_cast<int64_t>(pool.size()) >= total) {
        std::nth_element(pool.begin(), pool.begin() + (total - 1), pool.end(),
                         std::greater<float>());
        tau = pool[At(total - 1)];
      }
      std::vector<double> r(At(heads)), w(At(heads));
      for (int h = 0; h < heads; ++h) {
        const auto& s = in.scores[first + At(h)];
        r[At(h)] = static_cast<double>(
            std::count_if(s.begin(), s.end(), [tau](float v) { return v >= tau; }));
        w[At(h)] = std::pow(r[At(h)] + 1e-6, ac.head_exponent);
      }
      auto shares = Robustify(r, total, ac.head_exponent, ac.head_floor * static_cast<double>(cap),
                              static_cast<double>(total));
      if (!shares.ok()) return shares.status();
      const std::vector<double> x(shares->begin(), shares->end());
      RouteLayer(x, total, candidates, w, window, budgets.subspan(first, At(heads)));
    }
    return absl::OkStatus();
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

absl::StatusOr<std::unique_ptr<Allocator>> MakeAllocator(const AllocatorConfig& config) {
  if (config.name == "uniform") return std::make_unique<UniformAllocator>();
  if (config.name == "pyramid") return std::make_unique<PyramidAllocator>();
  if (config.name == "adakv") return std::make_unique<AdaKvAllocator>();
  if (config.name == "reasonalloc") return std::make_unique<ReasonAllocAllocator>();
  return absl::UnimplementedError(
      absl::StrCat("allocator.name \"", config.name, "\" is not implemented in this build yet"));
}

}  // namespace reasonalloc
