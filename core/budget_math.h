// Integer budget arithmetic shared by the allocators (docs/algorithms.md §3, "Common rules" and
// §3.4).
//
// Invariants: RoundPreservingSum returns integers that sum to exactly `total`; Robustify returns
// values in [lo, hi] (before rounding) that sum to exactly `total`; CapAndRedistribute never gives
// a unit more than its cap and keeps the sum unless every unit is saturated.
#ifndef REASONALLOC_CORE_BUDGET_MATH_H_
#define REASONALLOC_CORE_BUDGET_MATH_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace reasonalloc {

// floor(x_i), then +1 to the largest fractional parts until the sum is `total`; fractional parts
// that agree to 1e-6 are ties and go to the lower index. Requires Σ floor(x) <= total <= Σ floor(x)
// + n.
std::vector<int64_t> RoundPreservingSum(std::span<const double> x, int64_t total);

// "Floor α + 1": every unit ends with at least 1 (selectable token); a unit below 1 is raised one
// token at a time, each taken from the currently largest unit (ties: the higher index gives).
// Requires Σ units >= n.
void ApplySelectableFloor(std::span<int64_t> units);

// The robustify operator: w = (d + 1e-6)^p, the λ > 0 with Σ clip(λ·w_i, lo, hi) = total (solved
// exactly on the piecewise-linear sum), then RoundPreservingSum. InvalidArgument unless n·lo <=
// total <= n·hi.
absl::StatusOr<std::vector<int64_t>> Robustify(std::span<const double> demand, int64_t total,
                                               double p, double lo, double hi);

// Clips each unit to caps[i]; what the clipping frees is handed to units still below their cap in
// proportion to weights[i] (rounding preserving the sum), repeated until nothing is left or every
// unit is at its cap.
void CapAndRedistribute(std::span<int64_t> units, std::span<const int64_t> caps,
                        std::span<const double> weights);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_BUDGET_MATH_H_
