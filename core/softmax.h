// The fp32 softmax the scorers share (docs/algorithms.md §2: "Softmax in fp32").
#ifndef REASONALLOC_CORE_SOFTMAX_H_
#define REASONALLOC_CORE_SOFTMAX_H_

#include <algorithm>
#include <cmath>

namespace reasonalloc {

// Softmax of row[0, len) in place, scaled by `weight`; false (row untouched past the max) when the
// row holds ±Inf, so that no NaN reaches a score.
inline bool SoftmaxInPlace(float* row, int len, float weight) {
  const float max_logit = *std::max_element(row, row + len);
  if (!std::isfinite(max_logit)) return false;
  float sum = 0.0f;
  for (int j = 0; j < len; ++j) {
    row[j] = std::exp(row[j] - max_logit);
    sum += row[j];
  }
  const float inv = weight / sum;
  for (int j = 0; j < len; ++j) row[j] *= inv;
  return true;
}

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_SOFTMAX_H_
