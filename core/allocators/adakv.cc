// AdaKV (docs/algorithms.md §3.3): uniform layers; inside a layer the heads compete in one pool of
// candidate scores, each head getting its share of the pool's top picks softened by a floor.
#include <algorithm>
#include <vector>

#include "core/allocators/allocators.h"

namespace reasonalloc {
namespace {

class AdaKvAllocator final : public Allocator {
 public:
  bool RoutesHeads(const AllocatorConfig&) const override { return true; }

  absl::Status RouteHeads(const SessionConfig& c, const LayerPool& pool,
                          std::span<int32_t> layer) const override {
    const size_t heads = layer.size();
    const int window = c.budget.window;
    int64_t candidates = 0;
    for (int64_t n : pool.candidates) candidates += n;
    if (candidates <= pool.total) {
      // Every candidate fits: each head keeps all it has.
      for (size_t h = 0; h < heads; ++h) {
        layer[h] = static_cast<int32_t>(window + pool.candidates[h]);
      }
      return absl::OkStatus();
    }
    // Each head's share of the pool's top `total` picks (ties to the lower head, then the lower
    // token), softened by the floor a.
    const double a = c.allocator.adakv_floor;
    const int64_t cap = pool.total / static_cast<int64_t>(heads);
    int64_t ties_left = pool.total;
    for (int64_t g : pool.greater) ties_left -= g;
    std::vector<double> x(heads, a * static_cast<double>(cap));
    for (size_t h = 0; h < heads; ++h) {
      const int64_t ties = std::clamp<int64_t>(ties_left, 0, pool.equal[h]);
      ties_left -= ties;
      x[h] += (1 - a) * static_cast<double>(pool.greater[h] + ties);
    }
    RouteLayer(x, pool.total, pool.candidates, x, window, layer);
    return absl::OkStatus();
  }
};

}  // namespace

std::unique_ptr<Allocator> MakeAdaKvAllocator() { return std::make_unique<AdaKvAllocator>(); }

}  // namespace reasonalloc
