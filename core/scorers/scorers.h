// The scorers, one file each; core/policy.cc lists them.
#ifndef REASONALLOC_CORE_SCORERS_SCORERS_H_
#define REASONALLOC_CORE_SCORERS_SCORERS_H_

#include <memory>

#include "core/scorer.h"

namespace reasonalloc {

std::unique_ptr<Scorer> MakeSnapKvScorer(const ScorerConfig& config);
std::unique_ptr<Scorer> MakeStreamingScorer(const ScorerConfig& config);
std::unique_ptr<Scorer> MakeH2oScorer(const ScorerConfig& config);
std::unique_ptr<Scorer> MakeRkvScorer(const ScorerConfig& config);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_SCORERS_SCORERS_H_
