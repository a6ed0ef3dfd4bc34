#include "core/selector.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "core/scratch.h"

namespace reasonalloc {

int KeptCount(int n, int budget) { return n <= budget ? n : budget; }

void SelectHeadInto(std::span<const float> scores, int n, int budget, int window, int32_t* out) {
  if (n <= budget) {
    for (int j = 0; j < n; ++j) out[j] = j;
    return;
  }
  const int cand = n - window;
  const int k = budget - window;
  // A strict total order (score descending, index ascending; NaN below every number) makes the
  // kept set unique.
  using Entry = std::pair<float, int32_t>;
  thread_local std::vector<Entry> order;
  order.resize(static_cast<size_t>(cand));
  bool any_nan = false;
  for (int j = 0; j < cand; ++j) {
    const float s = scores[static_cast<size_t>(j)];
    any_nan |= std::isnan(s);
    order[static_cast<size_t>(j)] = {s, j};
  }
  auto better = [](const Entry& x, const Entry& y) {
    return x.first != y.first ? x.first > y.first : x.second < y.second;
  };
  auto better_nan = [](const Entry& x, const Entry& y) {
    const bool nx = std::isnan(x.first);
    const bool ny = std::isnan(y.first);
    if (nx != ny) return ny;
    if (!nx && x.first != y.first) return x.first > y.first;
    return x.second < y.second;
  };
  if (k < cand) {
    if (any_nan) {
      std::nth_element(order.begin(), order.begin() + k, order.end(), better_nan);
    } else {
      std::nth_element(order.begin(), order.begin() + k, order.end(), better);
    }
  }
  // Emit ascending through a mark per candidate instead of sorting the k kept.
  thread_local std::vector<char> mark;
  mark.assign(static_cast<size_t>(cand), 0);
  for (int i = 0; i < k; ++i) mark[static_cast<size_t>(order[static_cast<size_t>(i)].second)] = 1;
  int r = 0;
  for (int j = 0; j < cand; ++j) {
    if (mark[static_cast<size_t>(j)]) out[r++] = j;
  }
  for (int j = cand; j < n; ++j) out[r++] = j;
  TrimScratch(order);
  TrimScratch(mark);
}

int SelectHead(std::span<const float> scores, int n, int budget, int window,
               std::vector<int32_t>* kept) {
  const int count = KeptCount(n, budget);
  const size_t at = kept->size();
  kept->resize(at + static_cast<size_t>(count));
  SelectHeadInto(scores, n, budget, window, kept->data() + at);
  return count;
}

}  // namespace reasonalloc
