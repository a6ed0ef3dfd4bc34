#include "core/layer_profile.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "absl/strings/str_cat.h"

namespace reasonalloc {

int64_t KRho(std::span<const float> attention, double rho) {
  std::vector<float> sorted(attention.begin(), attention.end());
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  double sum = 0;
  for (size_t k = 0; k < sorted.size(); ++k) {
    sum += sorted[k];
    if (sum >= rho - 1e-7) return static_cast<int64_t>(k + 1);
  }
  return static_cast<int64_t>(sorted.size());
}

CalibrationAccumulator::CalibrationAccumulator(const ModelGeometry& model, int window, double rho)
    : model_(model),
      window_(window),
      rho_(rho),
      sum_(static_cast<size_t>(model.num_layers), 0.0),
      samples_(static_cast<size_t>(model.num_layers), 0) {}

bool CalibrationAccumulator::Observe(const CompressInputs& in) {
  const int group = model_.group_size();
  const int d = model_.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> logits, mean;
  // Added to the totals only once every head is measured: a cancelled event leaves no trace.
  std::vector<double> sum(sum_.size(), 0.0);
  std::vector<int64_t> samples(samples_.size(), 0);
  int64_t unpolled = 0;
  for (int l = 0; l < model_.num_layers; ++l) {
    for (int h = 0; h < model_.num_kv_heads; ++h) {
      const int64_t head = int64_t{l} * model_.num_kv_heads + h;
      const int n = in.lengths[static_cast<size_t>(head)];
      if (n == 0) continue;
      const float* keys = in.keys + head * in.n_max * d;
      mean.assign(static_cast<size_t>(n), 0.0f);
      for (int g = 0; g < group; ++g) {
        unpolled += int64_t{n} * d;
        if (in.cancelled && unpolled >= in.cancel_poll_work) {
          unpolled = 0;
          if (in.cancelled()) return false;
        }
        const float* q =
            in.query_window +
            ((int64_t{l} * model_.num_q_heads + int64_t{h} * group + g) * window_ + (window_ - 1)) *
                d;
        logits.resize(static_cast<size_t>(n));
        for (int j = 0; j < n; ++j) {
          float dot = 0;
          for (int i = 0; i < d; ++i) dot += q[i] * keys[static_cast<int64_t>(j) * d + i];
          logits[static_cast<size_t>(j)] = dot * scale;
        }
        const float mx = *std::max_element(logits.begin(), logits.end());
        double z = 0;
        for (float& v : logits) {
          v = std::exp(v - mx);
          z += v;
        }
        for (int j = 0; j < n; ++j) {
          mean[static_cast<size_t>(j)] +=
              static_cast<float>(logits[static_cast<size_t>(j)] / z / group);
        }
      }
      sum[static_cast<size_t>(l)] += static_cast<double>(KRho(mean, rho_));
      ++samples[static_cast<size_t>(l)];
    }
  }
  for (size_t l = 0; l < sum.size(); ++l) {
    sum_[l] += sum[l];
    samples_[l] += samples[l];
  }
  return true;
}

absl::StatusOr<std::vector<double>> CalibrationAccumulator::Demand() const {
  std::vector<double> mean(sum_.size());
  for (size_t l = 0; l < sum_.size(); ++l) {
    if (samples_[l] == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("calibration has no sample for layer ", l,
                       ": run Compress on the calibration session first"));
    }
    mean[l] = sum_[l] / static_cast<double>(samples_[l]);
  }
  return NormaliseDemand(mean, static_cast<int>(mean.size()), "demand");
}

absl::StatusOr<std::vector<double>> NormaliseDemand(std::span<const double> demand, int num_layers,
                                                    absl::string_view field) {
  if (static_cast<int>(demand.size()) != num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " has ", demand.size(), " entries; model.num_layers is ", num_layers));
  }
  double max = 0;
  for (size_t l = 0; l < demand.size(); ++l) {
    if (!std::isfinite(demand[l]) || demand[l] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, "[", l, "] = ", demand[l], " is not a finite non-negative number"));
    }
    max = std::max(max, demand[l]);
  }
  if (!(max > 0)) return absl::InvalidArgumentError(absl::StrCat(field, " is all zero"));
  // Scaled by the largest entry first, so that neither a denormal nor a near-overflow input
  // reaches the mean: every scaled entry is in [0, 1] and their sum in [1, L].
  std::vector<double> out(demand.begin(), demand.end());
  double sum = 0;
  for (double& v : out) {
    v /= max;
    sum += v;
  }
  for (double& v : out) v *= static_cast<double>(num_layers) / sum;
  return out;
}

absl::StatusOr<std::vector<double>> NormaliseHeadDemand(std::span<const double> demand,
                                                        int num_layers, int num_kv_heads,
                                                        absl::string_view field) {
  const size_t heads = static_cast<size_t>(num_kv_heads);
  if (demand.size() != static_cast<size_t>(num_layers) * heads) {
    return absl::InvalidArgumentError(absl::StrCat(field, " has ", demand.size(),
                                                   " entries; model.num_layers * "
                                                   "model.num_kv_heads is ",
                                                   int64_t{num_layers} * num_kv_heads));
  }
  std::vector<double> out(demand.begin(), demand.end());
  for (size_t first = 0; first < out.size(); first += heads) {
    double max = 0;
    for (size_t i = first; i < first + heads; ++i) {
      if (!std::isfinite(out[i]) || out[i] < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(field, "[", i, "] = ", out[i], " is not a finite non-negative number"));
      }
      max = std::max(max, out[i]);
    }
    // A layer none of whose heads cost anything splits equally.
    double sum = 0;
    for (size_t i = first; i < first + heads; ++i) {
      out[i] = max > 0 ? out[i] / max : 1.0;
      sum += out[i];
    }
    for (size_t i = first; i < first + heads; ++i) out[i] *= static_cast<double>(heads) / sum;
  }
  return out;
}

}  // namespace reasonalloc
