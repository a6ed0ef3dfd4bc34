#include "core/scorer.h"

#include <algorithm>
#include <atomic>

#include "core/policy.h"
#include "core/scorers/scorer_internal.h"

namespace reasonalloc {

namespace {
std::atomic<size_t> g_tile_bytes{0};
constexpr size_t kDefaultTileBytes = size_t{16} << 20;
}  // namespace

size_t ScoreTileBytes() {
  const size_t t = g_tile_bytes.load(std::memory_order_relaxed);
  return t == 0 ? kDefaultTileBytes : t;
}

void SetScoreTileBytesForTesting(size_t bytes) {
  g_tile_bytes.store(bytes, std::memory_order_relaxed);
}

namespace scorer_internal {

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

}  // namespace scorer_internal

absl::StatusOr<std::unique_ptr<Scorer>> MakeScorer(const ScorerConfig& config) {
  return PolicyOf(config.kind).make(config);
}

void ProtectScores(int n, int window, int sinks, int recent, std::span<float> scores) {
  const int cand = std::min(static_cast<int>(scores.size()), n - window);
  for (int j = std::max(0, n - recent); j < cand; ++j) {
    scores[static_cast<size_t>(j)] = kRecentScore - static_cast<float>(n - 1 - j);
  }
  for (int j = 0; j < std::min(sinks, cand); ++j) scores[static_cast<size_t>(j)] = kSinkScore;
}

}  // namespace reasonalloc
