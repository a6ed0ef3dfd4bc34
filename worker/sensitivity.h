// Per-layer sensitivity, the measured alternative to the k_ρ Reasoning Wave: how much the model's
// next-token distribution moves when one group of layers alone is compressed to a small budget
// while every other layer keeps its full cache.
//
// The full cache first decodes each probe prompt greedily (control tokens suppressed, so every
// trajectory has the same length) and keeps its log-probabilities. Then, for every group of
// layers and every prompt, the trajectory is replayed teacher-forced with that group's KV held in
// a sidecar session (the policy under test, at its budget) and the other layers in process memory;
// the group's sensitivity is the mean KL(full ‖ compressed) per generated token.
#ifndef REASONALLOC_WORKER_SENSITIVITY_H_
#define REASONALLOC_WORKER_SENSITIVITY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "worker/driver.h"
#include "worker/model.h"

namespace reasonalloc::worker {

// A KV backend whose sequence b keeps layers [first[b], first[b] + count[b]) in a sidecar session
// (of that many layers) and every other layer in a full cache.
class LayerProbeBackend : public KvBackend {
 public:
  static absl::StatusOr<std::unique_ptr<LayerProbeBackend>> Open(
      Client* client, const ModelConfig& config, const std::string& model_name,
      const Policy& policy, const std::vector<int>& first, const std::vector<int>& count);
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
  bool Probed(int b, int l) const {
    const size_t i = static_cast<size_t>(b);
    return l >= first_[i] && l < first_[i] + count_[i];
  }
  ModelConfig config_;
  std::unique_ptr<FullCacheBackend> full_;
  std::vector<std::unique_ptr<SidecarBackend>> probes_;  // one single-sequence backend per slot
  std::vector<int> first_, count_;
};

struct SensitivityOptions {
  Policy policy;                  // the compression applied to the probed layers
  int layer_group = 1;            // layers probed together
  int max_tokens = 256;           // generated tokens per probe prompt
  int batch = 32;                 // sequences (group × prompt) decoded together
  std::vector<int32_t> suppress;  // tokens never chosen (the control tokens)
};

struct SensitivityResult {
  std::vector<double> kl;          // [L] mean KL per generated token when its group is compressed
  std::vector<int64_t> positions;  // [L] positions behind each entry
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
