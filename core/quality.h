// Quality of a keep decision against the full cache, measured on later queries (docs/algorithms.md
// §7): attention-output error ‖o_S − o_full‖ / ‖o_full‖ and attention-mass recall Σ_{j∈S} a[j].
#ifndef REASONALLOC_CORE_QUALITY_H_
#define REASONALLOC_CORE_QUALITY_H_

#include <cstdint>

#include "core/engine.h"

namespace reasonalloc {

struct Quality {
  double output_error = 0;   // mean over (layer, query head, later query)
  double recall = 0;         // mean attention mass kept
  double recall_at_rho = 0;  // share of (layer, query head, later query) with recall >= rho
  double budget_spread = 0;  // mean over layers of max/min head budget
  int64_t samples = 0;
};

// later: [L, Hq, T, d] queries after the event; keys and values [L, Hkv, n_max, d] (fp32), the
// pre-event cache the decision was taken on.
Quality MeasureQuality(const ModelGeometry& model, const Decision& decision, const float* later,
                       int64_t later_count, const float* keys, const float* values, int64_t n_max,
                       std::span<const int32_t> lengths, double rho);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_QUALITY_H_
