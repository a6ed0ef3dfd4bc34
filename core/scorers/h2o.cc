#include <algorithm>
#include <memory>

#include "core/scorers/scorers.h"

namespace reasonalloc {
namespace {

// H2O (docs/algorithms.md §2.2): the score is the attention each token has accumulated, which the
// engine's caller carries per session (h2o.h).
class H2oScorer final : public Scorer {
 public:
  // The accumulation of the window's attention, which dominates an h2o event.
  int64_t Work(const HeadInputs& in) const override {
    return int64_t{in.n} * in.window * in.group * in.head_dim;
  }

  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const int cand = in.n - in.window;
    if (cand <= 0) return true;
    if (in.accumulated == nullptr) {
      std::fill(out.begin(), out.end(), 0.0f);
    } else {
      std::copy_n(in.accumulated, cand, out.begin());
    }
    return true;
  }
};

}  // namespace

std::unique_ptr<Scorer> MakeH2oScorer(const ScorerConfig&) { return std::make_unique<H2oScorer>(); }

}  // namespace reasonalloc
