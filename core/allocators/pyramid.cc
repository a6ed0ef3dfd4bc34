// PyramidKV (docs/algorithms.md §3.2): layer budgets falling linearly from the first layer to the
// last, the same for every head of a layer.
#include <vector>

#include "core/allocators/allocators.h"
#include "core/budget_math.h"

namespace reasonalloc {
namespace {

class PyramidAllocator final : public Allocator {
 public:
  absl::StatusOr<std::vector<int64_t>> LayerCaps(const SessionConfig& c,
                                                 std::span<const double>) const override {
    // kvpress's real-valued form: Σ_l x_l = L·base exactly (KVCache-Factory's integer steps
    // overshoot).
    const int L = c.model.num_layers;
    const int64_t base = c.budget.budget - c.budget.window;
    const double b = static_cast<double>(base);
    const double min_n = b / c.allocator.pyramid_beta;
    const double max_n = 2 * b - min_n;
    std::vector<double> x(static_cast<size_t>(L), b);
    if (L > 1) {
      for (int l = 0; l < L; ++l) {
        x[static_cast<size_t>(l)] = max_n - l * (max_n - min_n) / (L - 1);
      }
    }
    std::vector<int64_t> caps = RoundPreservingSum(x, L * base);
    ApplySelectableFloor(caps);
    return caps;
  }
};

}  // namespace

std::unique_ptr<Allocator> MakePyramidAllocator() { return std::make_unique<PyramidAllocator>(); }

}  // namespace reasonalloc
