// Per-layer sensitivity, the measured alternative to the k_ρ Reasoning Wave: how much the model's
// next-token distribution moves when one group of layers alone is compressed to a small budget
// while every other layer keeps its full cache.
//
// The full cache first decodes each probe prompt greedily (control tokens suppressed, so every
// trajectory has the same length) and keeps its log-probabilities. Then, for every group of
// layers and every prompt, the trajectory is replayed teacher-forced with that group's KV held in
// a sidecar session (the policy under test, at its budget) and the other layers in process memory;
// the group's sensitivity is the mean KL(full ‖ compressed) per generated token.
//
// Recall side (SensitivityOptions::answer_tokens): the probe prompts are long-range recall tasks
// (worker/recall_tasks.h); only the tasks the full cache answers count, and only the generated
// tokens through the one that ends the answer's word are measured: the KL there, and whether the
// compressed model's greedy choice equals the full cache's at every one of them (then greedy
// decoding with that group compressed writes the same answer).
//
// Per head (SensitivityOptions::per_head): the same with one KV head of the group compressed and
// every other head, of that layer too, keeping its full cache; the sidecar session then holds the
// group's layers with one KV head each (and that head's query group).
#ifndef REASONALLOC_WORKER_SENSITIVITY_H_
#define REASONALLOC_WORKER_SENSITIVITY_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "worker/driver.h"
#include "worker/model.h"

namespace reasonalloc::worker {

// A KV backend whose sequence b keeps layers [first[b], first[b] + count[b]) in a sidecar session
// (of that many layers) and every other layer in a full cache. With `head` (one entry per
// sequence), only KV head head[b] of those layers goes to the sidecar (a session of one KV head
// per layer) and the other heads stay in the full cache; head[b] = -1 probes every head.
class LayerProbeBackend : public KvBackend {
 public:
  static absl::StatusOr<std::unique_ptr<LayerProbeBackend>> Open(
      Client* client, const ModelConfig& config, const std::string& model_name,
      const Policy& policy, const std::vector<int>& first, const std::vector<int>& count,
      const std::vector<int>& head = {});
  int Length(int b, int l, int h) const override;
  float* KeyRow(int b, int l, int h, int row) override;
  float* ValueRow(int b, int l, int h, int row) override;
  absl::Status BeforeStep(int slot, int64_t step) override;
  absl::Status Commit(int slot, int64_t step, const float* keys, const float* values,
                      const float* queries) override;
  int64_t Bytes(int slot) const override { return full_->Bytes(slot); }
  int64_t events() const;

 private:
  LayerProbeBackend() = default;
  bool Probed(int b, int l, int h) const {
    const size_t i = static_cast<size_t>(b);
    return l >= first_[i] && l < first_[i] + count_[i] && (head_[i] < 0 || h == head_[i]);
  }
  // The probed head's index in its sequence's session.
  int SessionHead(int b, int h) const { return head_[static_cast<size_t>(b)] < 0 ? h : 0; }
  ModelConfig config_;
  std::unique_ptr<FullCacheBackend> full_;
  std::vector<std::unique_ptr<SidecarBackend>> probes_;  // one single-sequence backend per slot
  std::vector<int> first_, count_, head_;
  std::vector<float> keys_, values_, queries_;  // one head's rows gathered for its session
};

struct SensitivityOptions {
  Policy policy;                  // the compression applied to the probed layers
  int layer_group = 1;            // layers probed together
  bool per_head = false;          // probe each KV head of each group alone
  int max_tokens = 256;           // generated tokens per probe prompt
  int batch = 32;                 // sequences (group × prompt) decoded together
  std::vector<int32_t> suppress;  // tokens never chosen (the control tokens)
  // The recall side: given a prompt's index and the full cache's generated tokens, how many
  // leading tokens carry its answer (0: the full cache does not answer; the prompt is left out).
  // Unset: every prompt counts with all of its max_tokens tokens.
  std::function<int(int prompt, const std::vector<int32_t>& generated)> answer_tokens;
};

struct SensitivityResult {
  // [L] mean KL per generated token when its group is compressed; per head: [L * Hkv], entry
  // l * Hkv + h when head h of l's group is compressed alone.
  std::vector<double> kl;
  std::vector<int64_t> positions;  // positions behind each entry
  // With answer_tokens: per entry, the share of the answered prompts whose answer the compressed
  // model reproduces token for token (greedy choice equal to the full cache's at every answer
  // token); `answered` is how many prompts the full cache answers.
  std::vector<double> kept;
  int answered = 0;
  double full_seconds = 0, probe_seconds = 0;
  int64_t events = 0;
};

absl::StatusOr<SensitivityResult> MeasureSensitivity(
    const Model& model, Client* client, const std::string& model_name,
    const std::vector<std::vector<int32_t>>& prompts, const SensitivityOptions& options);

// The profile's demand from per-layer sensitivities: kl / mean(kl) (mean 1). An error when no
// layer loses anything (the budget holds the whole trajectory).
absl::StatusOr<std::vector<double>> DemandFromSensitivity(const std::vector<double>& kl);

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_SENSITIVITY_H_
