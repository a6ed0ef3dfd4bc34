// What the scorers in this folder share: the per-thread scratch they reuse across heads and
// events (so that scoring allocates nothing in the steady state) and the stop poll.
#ifndef REASONALLOC_CORE_SCORERS_SCORER_INTERNAL_H_
#define REASONALLOC_CORE_SCORERS_SCORER_INTERNAL_H_

#include <cstddef>
#include <vector>

#include "core/scorer.h"
#include "core/scratch.h"

namespace reasonalloc::scorer_internal {

struct Scratch {
  std::vector<float> logits_all;   // [G·α, cols], or a tile [A, cols]
  std::vector<float> tile;         // [A, cols]: one group's rows while the tiled path folds groups
  std::vector<float> row;          // [cols]
  std::vector<float> importance;   // [cand]
  std::vector<float> pooled;       // [cand]
  std::vector<float> normalised;   // [n, d]
  std::vector<float> gram;         // [n, n] upper triangle, or a row tile [T, n - i0]
  std::vector<double> column;      // [n]
  std::vector<int> last_below;     // [n]
  std::vector<float> below_value;  // [n]

  void Trim() {
    TrimScratch(logits_all);
    TrimScratch(tile);
    TrimScratch(row);
    TrimScratch(importance);
    TrimScratch(pooled);
    TrimScratch(normalised);
    TrimScratch(gram);
    TrimScratch(column);
    TrimScratch(last_below);
    TrimScratch(below_value);
  }
};

// This thread's scratch (core/scorer.cc).
Scratch& ThreadScratch();

inline constexpr size_t kF = sizeof(float);

inline bool Stopped(const HeadInputs& in) { return in.stop != nullptr && (*in.stop)(); }

}  // namespace reasonalloc::scorer_internal

#endif  // REASONALLOC_CORE_SCORERS_SCORER_INTERNAL_H_
