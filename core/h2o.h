// The per-session state of the h2o scorer (docs/algorithms.md §2.2): the attention each cached
// token has accumulated. Kept tokens carry their value through an event; new tokens start at 0.
//
// Each event adds, per head, either the attention the worker summed itself over the decode steps
// since the last event (InlineTensors.attention, [L, Hkv, N] fp32), or, when the worker sends none,
// the group-mean causal softmax attention of the window queries that are new since the last event
// (min(α, step − last step) newest rows; all α rows at the first event).
//
// Protocol: the first rows of each head at an event are the tokens it kept at the previous event,
// in order (what the Compress answer's compacted order gives); rows past them are new. Not
// thread-safe: a session runs one Compress at a time.
#ifndef REASONALLOC_CORE_H2O_H_
#define REASONALLOC_CORE_H2O_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"
#include "core/session_config.h"

namespace reasonalloc {

class H2oAccumulator {
 public:
  H2oAccumulator(const ModelGeometry& model, int window);

  // The accumulator of this event, [L, Hkv, n_max] fp32 (rows past a head's length are zero), for
  // CompressInputs::accumulated. `attention`, when not null, is the worker's [L, Hkv, n_max] sum;
  // it must be finite and non-negative. Fails with FAILED_PRECONDITION when a head now has fewer
  // rows than it kept at the last event.
  absl::StatusOr<std::vector<float>> Prepare(const CompressInputs& in, const float* attention,
                                             int64_t step) const;
  // After the event is committed: keep the values of the kept tokens, in kept order.
  void Commit(const Decision& decision, const std::vector<float>& accumulated, int64_t n_max,
              int64_t step);

  // Tokens carried per head (what the head kept at the last event).
  int64_t carried(int64_t head) const {
    return static_cast<int64_t>(carried_[static_cast<size_t>(head)].size());
  }

 private:
  ModelGeometry model_;
  int window_;
  bool has_step_ = false;
  int64_t last_step_ = 0;
  std::vector<std::vector<float>> carried_;  // [L * Hkv][kept]
};

// Adds to `acc` ([n]) the group-mean causal softmax attention of window rows [first_row, window)
// of one head's group (queries [G, window, d], keys [n, d]); the query of row a sits at position
// n − window + a and sees keys [0, n − window + a]. Rows before position 0 are skipped. Returns
// false when the logits overflow fp32.
bool AddWindowAttention(const float* queries, const float* keys, int n, int group, int window,
                        int head_dim, int first_row, float* acc);
// Window rows AddWindowAttention scores per GEMM for a head of n tokens (its logits are
// rows × n floats, within the scoring tile of scratch.h).
int H2oChunkRows(int n, int rows);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_H2O_H_
