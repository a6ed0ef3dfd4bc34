#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "core/blas.h"
#include "core/scorers/scorer_internal.h"
#include "core/scorers/scorers.h"
#include "core/scorers/snapkv.h"

namespace reasonalloc {
namespace scorer_internal {
namespace {

// R-KV's similarity matrix: whole (SYRK of the upper triangle) when n × n fits the tile, else
// `rows` rows at a time against the keys to their right.
struct RkvPlan {
  bool whole = true;
  int rows = 0;
  size_t bytes = 0;
};

RkvPlan PlanRkv(const HeadInputs& in) {
  RkvPlan p;
  const size_t n = static_cast<size_t>(std::max(0, in.n));
  const size_t tile = ScoreTileBytes();
  // normalised keys, column sums (double), last_below (int) and below_value (float).
  const size_t vectors = n * static_cast<size_t>(in.head_dim) * kF + n * (8 + 4 + 4);
  if (n * n * kF <= tile) {
    p.whole = true;
    p.rows = static_cast<int>(n);
    p.bytes = n * n * kF + vectors;
  } else {
    p.whole = false;
    p.rows = static_cast<int>(std::clamp<size_t>(tile / (n * kF), 1, n));
    p.bytes = static_cast<size_t>(p.rows) * n * kF + vectors;
  }
  return p;
}

// R-KV (docs/algorithms.md §2.4): SnapKV importance minus redundancy among the head's keys,
// Z = λ·I − (1 − λ)·R, where R is the softmax over all N keys of the mean cosine similarity of each
// key to the others (the newest near-duplicate of every key excluded from its row), sliced to
// candidates.
//
// S is symmetric, so only its upper triangle is needed and one pass over it, row by row, yields
// everything: the column sums (each u = S[i, j], i < j, adds to column j from row i and to column i
// from row j), the newest near-duplicate of row i to its right (scanning row i) and to its left
// (the largest earlier row whose entry in column i passed T, tracked with its value as rows go
// by). Retain-last then takes one entry out of each row. Because rows are visited in order and
// nothing looks back at an earlier row, S can be computed a tile of rows at a time: a head whose
// n × n block does not fit the scoring tile costs T·n floats of scratch instead of n².
class RkvScorer final : public Scorer {
 public:
  explicit RkvScorer(const ScorerConfig& config) : snapkv_(config), config_(config) {}

  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const bool ok = Score(in, out);
    ThreadScratch().Trim();
    return ok;
  }

  int64_t Work(const HeadInputs& in) const override {
    return snapkv_.Work(in) + int64_t{in.n} * in.n / 2 * in.head_dim;
  }

  // SnapKV's scratch stays allocated while the similarity pass runs.
  int64_t ScratchBytes(const HeadInputs& in) const override {
    return snapkv_.ScratchBytes(in) + static_cast<int64_t>(PlanRkv(in).bytes);
  }

 private:
  bool Score(const HeadInputs& in, std::span<float> out) const {
    const int n = in.n;
    const int cand = n - in.window;
    if (cand <= 0) return true;
    if (!snapkv_.Score(in, out)) return false;  // out = I
    const int d = in.head_dim;
    const size_t un = static_cast<size_t>(n);
    Scratch& sc = ThreadScratch();
    float* kn = Sized(sc.normalised, un * static_cast<size_t>(d));
    for (int j = 0; j < n; ++j) {
      const float* k = in.keys + static_cast<int64_t>(j) * d;
      double norm = 0;
      for (int i = 0; i < d; ++i) norm += static_cast<double>(k[i]) * k[i];
      const float inv = 1.0f / (static_cast<float>(std::sqrt(norm)) + 1e-8f);
      for (int i = 0; i < d; ++i) kn[static_cast<size_t>(j) * d + i] = k[i] * inv;
    }
    double* col = Sized(sc.column, un);
    int* last_below = Sized(sc.last_below, un);
    float* below_value = Sized(sc.below_value, un);
    std::fill(col, col + n, 0.0);
    std::fill(last_below, last_below + n, -1);
    const float threshold = static_cast<float>(config_.threshold);
    // Row i of S from column `base` on: row[j - base] = S[i, j] for j > i. `lookback(i)` is
    // S[last_below[i], i], from the whole matrix or, when tiled, from below_value.
    auto visit_row = [&](int i, const float* row, int base, auto track_value, auto lookback) {
      double row_sum = 0.0;
      int last_above = -1;
      for (int j = i + 1; j < n; ++j) {
        const float u = row[j - base];
        row_sum += u;
        col[j] += u;
        const bool dup = u > threshold;
        last_below[j] = dup ? i : last_below[j];
        if constexpr (decltype(track_value)::value) below_value[j] = dup ? u : below_value[j];
        last_above = dup ? j : last_above;
      }
      col[i] += row_sum;
      // Retain last: the newest near-duplicate of key i leaves row i's contribution to its column.
      // With T < 0 the zeroed diagonal itself is the newest match left of the right-hand side,
      // and taking it out changes nothing.
      if (last_above >= 0) {
        col[last_above] -= row[last_above - base];
      } else if (0.0f <= threshold && last_below[i] >= 0) {
        col[last_below[i]] -= lookback(i);
      }
    };
    const RkvPlan plan = PlanRkv(in);
    if (plan.whole) {
      float* s = Sized(sc.gram, un * un);
      SyrkUpper(n, d, kn, s);
      auto from_matrix = [&](int i) {
        return s[static_cast<size_t>(last_below[i]) * un + static_cast<size_t>(i)];
      };
      for (int i = 0; i < n; ++i) {
        visit_row(i, s + static_cast<size_t>(i) * un, 0, std::false_type{}, from_matrix);
      }
    } else {
      // Rows [i0, i1) against columns [i0, n): the diagonal block's lower part is computed and
      // ignored.
      float* tile = Sized(sc.gram, static_cast<size_t>(plan.rows) * un);
      auto from_values = [&](int i) { return below_value[i]; };
      for (int i0 = 0; i0 < n; i0 += plan.rows) {
        if (Stopped(in)) return true;
        const int i1 = std::min(n, i0 + plan.rows);
        const int width = n - i0;
        const float* block = kn + static_cast<size_t>(i0) * d;
        GemmABt(i1 - i0, width, d, 1.0f, block, block, tile);
        for (int i = i0; i < i1; ++i) {
          visit_row(i, tile + static_cast<size_t>(i - i0) * static_cast<size_t>(width), i0,
                    std::true_type{}, from_values);
        }
      }
    }
    double max_mean = -1e300;
    for (int j = 0; j < n; ++j) {
      col[j] /= n;
      max_mean = std::max(max_mean, col[j]);
    }
    double z = 0;
    for (int j = 0; j < n; ++j) z += std::exp(col[j] - max_mean);
    const float lambda = static_cast<float>(config_.lambda);
    for (int j = 0; j < cand; ++j) {
      const float r = static_cast<float>(std::exp(col[j] - max_mean) / z);
      out[static_cast<size_t>(j)] = lambda * out[static_cast<size_t>(j)] - (1.0f - lambda) * r;
    }
    return true;
  }

  SnapKvScorer snapkv_;
  ScorerConfig config_;
};

}  // namespace
}  // namespace scorer_internal

std::unique_ptr<Scorer> MakeRkvScorer(const ScorerConfig& config) {
  return std::make_unique<scorer_internal::RkvScorer>(config);
}

}  // namespace reasonalloc
