#include "core/budget_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace reasonalloc {

std::vector<int64_t> RoundPreservingSum(std::span<const double> x, int64_t total) {
  const size_t n = x.size();
  std::vector<int64_t> out(n);
  std::vector<int64_t> frac(n);  // fractional part in units of 1e-6: equal keys are ties
  int64_t sum = 0;
  for (size_t i = 0; i < n; ++i) {
    const double f = std::floor(x[i]);
    out[i] = static_cast<int64_t>(f);
    frac[i] = std::llround((x[i] - f) * 1e6);
    sum += out[i];
  }
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return frac[a] > frac[b]; });
  for (int64_t k = 0; sum < total && n > 0; ++k, ++sum) ++out[order[static_cast<size_t>(k) % n]];
  return out;
}

void ApplySelectableFloor(std::span<int64_t> units) {
  const size_t n = units.size();
  for (size_t i = 0; i < n; ++i) {
    while (units[i] < 1) {
      size_t giver = n;
      for (size_t j = 0; j < n; ++j) {
        if (j == i) continue;
        if (giver == n || units[j] >= units[giver]) giver = j;  // ">=": the higher index gives
      }
      if (giver == n || units[giver] <= 1) return;  // nothing left to give
      --units[giver];
      ++units[i];
    }
  }
}

absl::StatusOr<std::vector<int64_t>> Robustify(std::span<const double> demand, int64_t total,
                                               double p, double lo, double hi) {
  const size_t n = demand.size();
  const double t = static_cast<double>(total);
  if (n == 0) return std::vector<int64_t>{};
  for (size_t i = 0; i < n; ++i) {
    // A non-finite demand would make the weights (and the rounding below) meaningless.
    if (!std::isfinite(demand[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("robustify: demand[", i, "] = ", demand[i], " is not finite"));
    }
  }
  if (!(lo <= hi) || static_cast<double>(n) * lo > t + 1e-9 ||
      static_cast<double>(n) * hi < t - 1e-9) {
    return absl::InvalidArgumentError(
        absl::StrCat("robustify: total ", total, " is outside [n·lo, n·hi] = [",
                     static_cast<double>(n) * lo, ", ", static_cast<double>(n) * hi, "]"));
  }
  std::vector<double> w(n);
  for (size_t i = 0; i < n; ++i) {
    w[i] = std::pow(std::max(0.0, demand[i]) + 1e-6, p);
    if (!std::isfinite(w[i])) w[i] = std::numeric_limits<double>::max();
  }
  auto sum_at = [&](double lambda) {
    double s = 0;
    for (size_t i = 0; i < n; ++i) s += std::clamp(lambda * w[i], lo, hi);
    return s;
  };
  // Σ clip(λ w_i) is piecewise linear and non-decreasing in λ with breakpoints lo/w_i and hi/w_i:
  // find the segment holding `total`, then solve the linear piece exactly.
  std::vector<double> breaks;
  breaks.reserve(2 * n + 1);
  breaks.push_back(0.0);
  for (size_t i = 0; i < n; ++i) {
    breaks.push_back(lo / w[i]);
    breaks.push_back(hi / w[i]);
  }
  std::sort(breaks.begin(), breaks.end());
  std::vector<double> x(n);
  double lambda = breaks.back();
  for (size_t k = 1; k < breaks.size(); ++k) {
    const double a = breaks[k - 1], b = breaks[k];
    const double fb = sum_at(b);
    if (fb < t) continue;
    // On [a, b] every unit is fixed at lo, fixed at hi, or free (λ·w_i): Σ = fixed + λ·Σ free w.
    const double mid = 0.5 * (a + b);
    double fixed = 0, slope = 0;
    for (size_t i = 0; i < n; ++i) {
      const double v = mid * w[i];
      if (v <= lo) {
        fixed += lo;
      } else if (v >= hi) {
        fixed += hi;
      } else {
        slope += w[i];
      }
    }
    lambda = slope > 0 ? std::clamp((t - fixed) / slope, a, b) : b;
    break;
  }
  double s = 0;
  for (size_t i = 0; i < n; ++i) {
    x[i] = std::clamp(lambda * w[i], lo, hi);
    s += x[i];
  }
  // Float residue (≪ 1 token) goes to the free units so that rounding sees the exact total.
  const double residue = t - s;
  if (std::abs(residue) > 0) {
    for (size_t i = 0; i < n; ++i) {
      if (x[i] > lo && x[i] < hi) {
        x[i] += residue;
        break;
      }
    }
  }
  return RoundPreservingSum(x, total);
}

void CapAndRedistribute(std::span<int64_t> units, std::span<const int64_t> caps,
                        std::span<const double> weights) {
  const size_t n = units.size();
  for (;;) {
    int64_t freed = 0;
    for (size_t i = 0; i < n; ++i) {
      if (units[i] > caps[i]) {
        freed += units[i] - caps[i];
        units[i] = caps[i];
      }
    }
    if (freed == 0) return;
    std::vector<size_t> open;
    double weight = 0;
    for (size_t i = 0; i < n; ++i) {
      if (units[i] < caps[i]) {
        open.push_back(i);
        weight += weights[i];
      }
    }
    if (open.empty()) return;  // every unit saturated: the layer keeps less than its total
    std::vector<double> share(open.size());
    for (size_t k = 0; k < open.size(); ++k) {
      share[k] = weight > 0 ? static_cast<double>(freed) * weights[open[k]] / weight
                            : static_cast<double>(freed) / static_cast<double>(open.size());
    }
    const std::vector<int64_t> add = RoundPreservingSum(share, freed);
    for (size_t k = 0; k < open.size(); ++k) units[open[k]] += add[k];
  }
}

}  // namespace reasonalloc
