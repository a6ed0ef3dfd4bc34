#include "core/quality.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace reasonalloc {

Quality MeasureQuality(const ModelGeometry& m, const Decision& decision, const float* later,
                       int64_t later_count, const float* keys, const float* values, int64_t n_max,
                       std::span<const int32_t> lengths, double rho) {
  Quality out;
  const int d = m.head_dim;
  const int group = m.group_size();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> a, full(static_cast<size_t>(d)), kept(static_cast<size_t>(d));
  std::vector<char> in_set;
  for (int l = 0; l < m.num_layers; ++l) {
    int32_t lo = INT32_MAX, hi = 0;
    for (int h = 0; h < m.num_kv_heads; ++h) {
      const int64_t head = int64_t{l} * m.num_kv_heads + h;
      lo = std::min(lo, decision.budgets[static_cast<size_t>(head)]);
      hi = std::max(hi, decision.budgets[static_cast<size_t>(head)]);
      const int n = lengths[static_cast<size_t>(head)];
      if (n == 0) continue;
      const float* k = keys + head * n_max * d;
      const float* v = values + head * n_max * d;
      in_set.assign(static_cast<size_t>(n), 0);
      for (int32_t j : decision.Kept(head)) in_set[static_cast<size_t>(j)] = 1;
      for (int g = 0; g < group; ++g) {
        for (int64_t t = 0; t < later_count; ++t) {
          const float* q =
              later + ((int64_t{l} * m.num_q_heads + int64_t{h} * group + g) * later_count + t) * d;
          a.resize(static_cast<size_t>(n));
          double mx = -1e300;
          for (int j = 0; j < n; ++j) {
            double dot = 0;
            for (int i = 0; i < d; ++i) dot += static_cast<double>(q[i]) * k[int64_t{j} * d + i];
            a[static_cast<size_t>(j)] = dot * scale;
            mx = std::max(mx, a[static_cast<size_t>(j)]);
          }
          double z = 0, zs = 0;
          for (int j = 0; j < n; ++j) {
            a[static_cast<size_t>(j)] = std::exp(a[static_cast<size_t>(j)] - mx);
            z += a[static_cast<size_t>(j)];
            if (in_set[static_cast<size_t>(j)]) zs += a[static_cast<size_t>(j)];
          }
          std::fill(full.begin(), full.end(), 0.0);
          std::fill(kept.begin(), kept.end(), 0.0);
          for (int j = 0; j < n; ++j) {
            const double w = a[static_cast<size_t>(j)];
            for (int i = 0; i < d; ++i) {
              full[static_cast<size_t>(i)] += w / z * v[int64_t{j} * d + i];
              if (in_set[static_cast<size_t>(j)] && zs > 0) {
                kept[static_cast<size_t>(i)] += w / zs * v[int64_t{j} * d + i];
              }
            }
          }
          double num = 0, den = 0;
          for (int i = 0; i < d; ++i) {
            num += (kept[static_cast<size_t>(i)] - full[static_cast<size_t>(i)]) *
                   (kept[static_cast<size_t>(i)] - full[static_cast<size_t>(i)]);
            den += full[static_cast<size_t>(i)] * full[static_cast<size_t>(i)];
          }
          const double recall = zs / z;
          out.output_error += den > 0 ? std::sqrt(num / den) : 0.0;
          out.recall += recall;
          out.recall_at_rho += recall >= rho ? 1.0 : 0.0;
          ++out.samples;
        }
      }
    }
    out.budget_spread += lo > 0 ? static_cast<double>(hi) / lo : 0.0;
  }
  if (out.samples > 0) {
    out.output_error /= static_cast<double>(out.samples);
    out.recall /= static_cast<double>(out.samples);
    out.recall_at_rho /= static_cast<double>(out.samples);
  }
  out.budget_spread /= m.num_layers;
  return out;
}

}  // namespace reasonalloc
