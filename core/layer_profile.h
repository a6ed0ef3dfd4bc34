// Layer profiles, the offline "Reasoning Wave" of docs/algorithms.md §3.4: how many tokens each
// layer needs to keep a fraction ρ of the newest query's attention, measured during full-cache
// decoding.
//
// A profile stores the normalised demand D (mean 1 over layers), never budgets, so one profile
// serves every budget B.
#ifndef REASONALLOC_CORE_LAYER_PROFILE_H_
#define REASONALLOC_CORE_LAYER_PROFILE_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"
#include "core/session_config.h"

namespace reasonalloc {

// Smallest k whose top-k entries of `attention` (a distribution) sum to at least rho.
int64_t KRho(std::span<const float> attention, double rho);

// Accumulates k_ρ per layer: for each (layer, KV head), the group-mean softmax attention of the
// newest query (row window − 1 of the query window) over all live tokens of the head.
class CalibrationAccumulator {
 public:
  CalibrationAccumulator(const ModelGeometry& model, int window, double rho);
  // Adds one measurement per head. Polls in.cancelled between heads (every
  // in.cancel_poll_work multiply-adds) and, when it fires, adds nothing and returns false.
  bool Observe(const CompressInputs& in);
  double rho() const { return rho_; }
  const std::vector<int64_t>& samples() const { return samples_; }
  // Mean k_ρ per layer, normalised to mean 1. FailedPrecondition when a layer has no sample.
  absl::StatusOr<std::vector<double>> Demand() const;

 private:
  ModelGeometry model_;
  int window_;
  double rho_;
  std::vector<double> sum_;
  std::vector<int64_t> samples_;
};

// Checks a demand vector (finite, non-negative, not all zero, one entry per layer) and returns it
// normalised to mean 1. Errors name `field`.
absl::StatusOr<std::vector<double>> NormaliseDemand(std::span<const double> demand, int num_layers,
                                                    absl::string_view field);
// The same for a head demand ([num_layers * num_kv_heads], layer-major): each layer's entries
// normalised to mean 1 (a layer of zeros to equal shares). Errors name `field`.
absl::StatusOr<std::vector<double>> NormaliseHeadDemand(std::span<const double> demand,
                                                        int num_layers, int num_kv_heads,
                                                        absl::string_view field);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_LAYER_PROFILE_H_
