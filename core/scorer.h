// Scorers rank the candidate tokens of one KV head (docs/algorithms.md §2): a higher score means
// more worth keeping. Candidates are positions [0, n - window); the last `window` tokens are always
// kept and never scored.
//
// Scorers are stateless and thread-safe: the engine calls ScoreHead for many heads concurrently.
#ifndef REASONALLOC_CORE_SCORER_H_
#define REASONALLOC_CORE_SCORER_H_

#include <functional>
#include <memory>
#include <span>

#include "absl/status/statusor.h"
#include "core/session_config.h"

namespace reasonalloc {

// The inputs of one (layer, KV head), in fp32.
struct HeadInputs {
  const float* queries =
      nullptr;                  // [group, window, head_dim]: the window queries of the head's group
  const float* keys = nullptr;  // [n, head_dim], post-RoPE
  int n = 0;                    // live tokens of the head
  int group = 1;
  int window = 8;
  int head_dim = 0;
  const float* accumulated = nullptr;  // [n] h2o: attention accumulated per token (h2o.h)
  // Polled between the tiles of a long head; when it returns true the scorer returns at once with
  // its scores unfinished (the engine, which owns the flag, then answers CANCELLED).
  const std::function<bool()>* stop = nullptr;
};

class Scorer {
 public:
  virtual ~Scorer() = default;
  // Writes one score per candidate into `out` (size max(0, n - window)). Returns false when finite
  // inputs still overflow fp32 (logits of ±Inf), so that no NaN score ever reaches the selector.
  virtual bool ScoreHead(const HeadInputs& in, std::span<float> out) const = 0;
  // Multiply-adds ScoreHead spends on one head of n tokens (the engine bounds the work of an
  // event).
  virtual int64_t Work(const HeadInputs&) const { return 0; }
  // Bytes of per-thread scratch ScoreHead needs for one head, computed from the shapes alone (the
  // engine bounds the memory of an event before anything is allocated). Scratch beyond
  // kRetainedScratchBytes (scratch.h) is given back when the head is done.
  virtual int64_t ScratchBytes(const HeadInputs&) const { return 0; }
};

absl::StatusOr<std::unique_ptr<Scorer>> MakeScorer(const ScorerConfig& config);

// Scores of always-kept candidates, above every score a scorer gives (docs/algorithms.md §2.5):
// the first `sinks` rows score kSinkScore, rows of age a (n - 1 - row) below `recent` score
// kRecentScore - a, so that a head given fewer rows than it protects keeps its sinks first, then
// its newest rows. Both are exact in fp32.
inline constexpr float kSinkScore = 33554432.0f;    // 2^25
inline constexpr float kRecentScore = 16777216.0f;  // 2^24
// Raises the protected candidates of one head of n rows (scores: its n - window candidates).
void ProtectScores(int n, int window, int sinks, int recent, std::span<float> scores);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_SCORER_H_
