#include "core/selector.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace reasonalloc {

int SelectHead(std::span<const float> scores, int n, int budget, int window,
               std::vector<int32_t>* kept) {
  if (n <= budget) {
    for (int j = 0; j < n; ++j) kept->push_back(j);
    return n;
  }
  const int cand = n - window;
  const int k = budget - window;
  std::vector<int32_t> order(static_cast<size_t>(cand));
  std::iota(order.begin(), order.end(), 0);
  // A strict total order (score descending, index ascending) makes the kept set unique.
  auto better = [&](int32_t x, int32_t y) {
    const float sx = scores[static_cast<size_t>(x)];
    const float sy = scores[static_cast<size_t>(y)];
    const bool nx = std::isnan(sx);
    const bool ny = std::isnan(sy);
    if (nx != ny) return ny;
    if (!nx && sx != sy) return sx > sy;
    return x < y;
  };
  std::nth_element(order.begin(), order.begin() + k, order.end(), better);
  std::sort(order.begin(), order.begin() + k);
  kept->insert(kept->end(), order.begin(), order.begin() + k);
  for (int j = cand; j < n; ++j) kept->push_back(j);
  return budget;
}

}  // namespace reasonalloc
