#include <memory>

#include "core/scorers/scorers.h"

namespace reasonalloc {
namespace {

// StreamingLLM (docs/algorithms.md §2.3): newer tokens before older ones (its sinks are the
// engine's, ProtectScores). "Newer" is the age from the head's end: row j of a head of n rows
// scores -(n - 1 - j), so that heads of different lengths (ragged after any head-wise event)
// compare by recency when an allocator pools their candidates, not by row index.
class StreamingScorer final : public Scorer {
 public:
  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const int cand = in.n - in.window;
    for (int j = 0; j < cand; ++j) out[static_cast<size_t>(j)] = static_cast<float>(j - (in.n - 1));
    return true;
  }
};

}  // namespace

std::unique_ptr<Scorer> MakeStreamingScorer(const ScorerConfig&) {
  return std::make_unique<StreamingScorer>();
}

}  // namespace reasonalloc
