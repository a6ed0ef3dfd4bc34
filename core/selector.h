// Per-head selection (docs/algorithms.md §1, §4): keep the top (b - window) candidates by score,
// ties to the lower (older) index, plus the last `window` tokens; a head with n <= b keeps
// everything.
#ifndef REASONALLOC_CORE_SELECTOR_H_
#define REASONALLOC_CORE_SELECTOR_H_

#include <cstdint>
#include <span>
#include <vector>

namespace reasonalloc {

// Appends the kept positions of one head, ascending, to `kept`. `scores` holds n - window candidate
// scores (NaN ranks below every number). Returns how many were appended.
int SelectHead(std::span<const float> scores, int n, int budget, int window,
               std::vector<int32_t>* kept);

// How many positions a head of n tokens keeps at budget b: min(n, b).
int KeptCount(int n, int budget);
// SelectHead writing its KeptCount(n, budget) positions to `out`.
void SelectHeadInto(std::span<const float> scores, int n, int budget, int window, int32_t* out);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_SELECTOR_H_
