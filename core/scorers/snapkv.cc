#include "core/scorers/snapkv.h"

#include <memory>

#include "core/scorers/scorers.h"

namespace reasonalloc {
namespace scorer_internal {

SnapKvPlan PlanSnapKv(const HeadInputs& in, bool softmax_all_keys) {
  SnapKvPlan p;
  p.cand = std::max(0, in.n - in.window);
  if (p.cand == 0) return p;
  p.cols = softmax_all_keys ? in.n : p.cand;
  const size_t cols = static_cast<size_t>(p.cols);
  const size_t rows = static_cast<size_t>(in.group) * static_cast<size_t>(in.window);
  const size_t tile = ScoreTileBytes();
  // row, importance and pooled beside the logits.
  const size_t vectors = (cols + 2 * static_cast<size_t>(p.cand)) * kF;
  if (rows * cols * kF <= tile) {
    p.whole = true;
    p.chunk = in.window;
    p.bytes = rows * cols * kF + vectors;
  } else {
    p.whole = false;
    p.chunk = static_cast<int>(
        std::clamp<size_t>(tile / (2 * cols * kF), 1, static_cast<size_t>(in.window)));
    p.bytes = 2 * static_cast<size_t>(p.chunk) * cols * kF + vectors;
  }
  return p;
}

}  // namespace scorer_internal

std::unique_ptr<Scorer> MakeSnapKvScorer(const ScorerConfig& config) {
  return std::make_unique<scorer_internal::SnapKvScorer>(config);
}

}  // namespace reasonalloc
