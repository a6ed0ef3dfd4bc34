#include "core/scorer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/blas.h"
#include "core/softmax.h"

namespace reasonalloc {
namespace {

// Per-thread scratch, reused across heads and events so that scoring allocates nothing in the
// steady state.
struct Scratch {
  std::vector<float> logits_all;  // [G·α, cols]
  std::vector<float> row;         // [cols]
  std::vector<float> importance;  // [cand]
  std::vector<float> pooled;      // [cand]
  std::vector<float> normalised;  // [n, d]
  std::vector<float> gram;        // [n, n], upper triangle
  std::vector<double> column;     // [n]
  std::vector<int> last_below;    // [n]
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

template <typename T>
T* Sized(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// SnapKV importance in its decode-time form (ALGORITHMS.md §2.1): window queries of the group
// against the keys, softmax, mean over the window, then 1-D pooling. The GQA reduction acts on the
// logits before the softmax (max, mean: R-KV) or on the pooled per-query-head scores after it
// (mean_scores: kvpress). The softmax runs over the candidates only (R-KV) or over all keys,
// causal inside the window (kvpress), then sliced to the candidates.
class SnapKvScorer final : public Scorer {
 public:
  explicit SnapKvScorer(const ScorerConfig& config) : config_(config) {}

  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const int cand = in.n - in.window;
    if (cand <= 0) return true;
    const int d = in.head_dim;
    const int cols = config_.softmax_all_keys ? in.n : cand;
    const int rows = in.group * in.window;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    Scratch& sc = ThreadScratch();
    // All window queries of the group against the keys in one GEMM: [G·α, d] x [cols, d]^T.
    float* all = Sized(sc.logits_all, static_cast<size_t>(rows) * static_cast<size_t>(cols));
    GemmABt(rows, cols, d, scale, in.queries, in.keys, all);
    float* row = Sized(sc.row, static_cast<size_t>(cols));
    float* importance = Sized(sc.importance, static_cast<size_t>(cand));
    const float inv_window = 1.0f / static_cast<float>(in.window);
    // The query of window row a sits at position cand + a and sees keys [0, cand + a].
    auto visible = [&](int a) { return config_.softmax_all_keys ? cand + a + 1 : cand; };

    if (config_.gqa_reduce == GqaReduce::kMeanScores) {
      std::fill(out.begin(), out.end(), 0.0f);
      float* pooled = Sized(sc.pooled, static_cast<size_t>(cand));
      const float inv_group = 1.0f / static_cast<float>(in.group);
      for (int g = 0; g < in.group; ++g) {
        std::fill(importance, importance + cand, 0.0f);
        for (int a = 0; a < in.window; ++a) {
          const int len = visible(a);
          std::copy_n(all + (static_cast<size_t>(g) * in.window + a) * cols, len, row);
          if (!SoftmaxInPlace(row, len, inv_window)) return false;
          for (int j = 0; j < cand; ++j) importance[j] += row[j];
        }
        Pool(importance, cand, pooled);
        for (int j = 0; j < cand; ++j) out[static_cast<size_t>(j)] += pooled[j] * inv_group;
      }
      return true;
    }

    std::fill(importance, importance + cand, 0.0f);
    for (int a = 0; a < in.window; ++a) {
      const int len = visible(a);
      std::copy_n(all + static_cast<size_t>(a) * cols, len, row);
      for (int g = 1; g < in.group; ++g) {
        const float* other = all + (static_cast<size_t>(g) * in.window + a) * cols;
        if (config_.gqa_reduce == GqaReduce::kMax) {
          for (int j = 0; j < len; ++j) row[j] = std::max(row[j], other[j]);
        } else {
          for (int j = 0; j < len; ++j) row[j] += other[j];
        }
      }
      if (config_.gqa_reduce == GqaReduce::kMean) {
        const float inv_group = 1.0f / static_cast<float>(in.group);
        for (int j = 0; j < len; ++j) row[j] *= inv_group;
      }
      if (!SoftmaxInPlace(row, len, inv_window)) return false;
      for (int j = 0; j < cand; ++j) importance[j] += row[j];
    }
    Pool(importance, cand, out.data());
    return true;
  }

  int64_t Work(const HeadInputs& in) const override {
    const int cand = std::max(0, in.n - in.window);
    const int cols = config_.softmax_all_keys && cand > 0 ? in.n : cand;
    return int64_t{cols} * in.window * in.group * in.head_dim;
  }

 private:
  // Stride-1 pooling with kernel k and padding k/2: max pooling ignores the padding, average
  // pooling counts it as zeros and divides by k (PyTorch's avg_pool1d default).
  void Pool(const float* in, int n, float* out) const {
    const int r = config_.pool_kernel / 2;
    for (int j = 0; j < n; ++j) {
      const int lo = std::max(0, j - r);
      const int hi = std::min(n - 1, j + r);
      if (config_.pool_kind == PoolKind::kMax) {
        float m = in[lo];
        for (int i = lo + 1; i <= hi; ++i) m = std::max(m, in[i]);
        out[j] = m;
      } else {
        float s = 0.0f;
        for (int i = lo; i <= hi; ++i) s += in[i];
        out[j] = s / static_cast<float>(config_.pool_kernel);
      }
    }
  }

  ScorerConfig config_;
};

// R-KV (ALGORITHMS.md §2.4): SnapKV importance minus redundancy among the head's keys,
// Z = λ·I − (1 − λ)·R, where R is the softmax over all N keys of the mean cosine similarity of each
// key to the others (the newest near-duplicate of every key excluded from its row), sliced to
// candidates.
//
// S is symmetric, so SYRK computes its upper triangle only and one pass over that triangle yields
// everything: the column sums (each u = S[i, j], i < j, adds to column j from row i and to column i
// from row j), the newest near-duplicate of row i to its right (scanning row i) and to its left
// (the largest earlier row whose entry in column i passed T, tracked as rows go by). Retain-last
// then takes one entry out of each row.
class RkvScorer final : public Scorer {
 public:
  explicit RkvScorer(const ScorerConfig& config) : snapkv_(config), config_(config) {}

  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const int n = in.n;
    const int cand = n - in.window;
    if (cand <= 0) return true;
    if (!snapkv_.ScoreHead(in, out)) return false;  // out = I
    const int d = in.head_dim;
    Scratch& sc = ThreadScratch();
    float* kn = Sized(sc.normalised, static_cast<size_t>(n) * static_cast<size_t>(d));
    for (int j = 0; j < n; ++j) {
      const float* k = in.keys + static_cast<int64_t>(j) * d;
      double norm = 0;
      for (int i = 0; i < d; ++i) norm += static_cast<double>(k[i]) * k[i];
      const float inv = 1.0f / (static_cast<float>(std::sqrt(norm)) + 1e-8f);
      for (int i = 0; i < d; ++i) kn[static_cast<size_t>(j) * d + i] = k[i] * inv;
    }
    float* s = Sized(sc.gram, static_cast<size_t>(n) * static_cast<size_t>(n));
    SyrkUpper(n, d, kn, s);
    double* col = Sized(sc.column, static_cast<size_t>(n));
    int* last_below = Sized(sc.last_below, static_cast<size_t>(n));
    std::fill(col, col + n, 0.0);
    std::fill(last_below, last_below + n, -1);
    const float threshold = static_cast<float>(config_.threshold);
    for (int i = 0; i < n; ++i) {
      const float* row = s + static_cast<size_t>(i) * n;
      double row_sum = 0.0;
      int last_above = -1;
      for (int j = i + 1; j < n; ++j) {
        const float u = row[j];
        row_sum += u;
        col[j] += u;
        const bool dup = u > threshold;
        last_below[j] = dup ? i : last_below[j];
        last_above = dup ? j : last_above;
      }
      col[i] += row_sum;
      // Retain last: the newest near-duplicate of key i leaves row i's contribution to its column.
      // With T < 0 the zeroed diagonal itself is the newest match left of the right-hand side,
      // and taking it out changes nothing.
      if (last_above >= 0) {
        col[last_above] -= row[last_above];
      } else if (0.0f <= threshold && last_below[i] >= 0) {
        col[last_below[i]] -= s[static_cast<size_t>(last_below[i]) * n + i];
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

  int64_t Work(const HeadInputs& in) const override {
    return snapkv_.Work(in) + int64_t{in.n} * in.n / 2 * in.head_dim;
  }

 private:
  SnapKvScorer snapkv_;
  ScorerConfig config_;
};

// StreamingLLM (ALGORITHMS.md §2.3): sinks rank first, then newer tokens before older ones.
// Positions are below 2^24 and exact in fp32; 2^24 itself outranks all of them.
class StreamingScorer final : public Scorer {
 public:
  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const int cand = in.n - in.window;
    const float sink_score = static_cast<float>(kMaxContext);
    for (int j = 0; j < cand; ++j) {
      out[static_cast<size_t>(j)] = j < in.sinks ? sink_score : static_cast<float>(j);
    }
    return true;
  }
};

// H2O (ALGORITHMS.md §2.2): the score is the attention each token has accumulated, which the
// engine's caller carries per session (h2o.h).
class H2oScorer final : public Scorer {
 public:
  // The accumulation of the window's attention, which dominates an h2o event.
  int64_t Work(const HeadInputs& in) const override {
    return int64_t{in.n} * in.window * in.group * in.head_dim;
  }

  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const int cand = in.n - in.window;
    if (cand <= 0) return true;
    if (in.accumulated == nullptr) {
      std::fill(out.begin(), out.end(), 0.0f);
    } else {
      std::copy_n(in.accumulated, cand, out.begin());
    }
    return true;
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Scorer>> MakeScorer(const ScorerConfig& config) {
  if (config.name == "snapkv") return std::make_unique<SnapKvScorer>(config);
  if (config.name == "streaming") return std::make_unique<StreamingScorer>();
  if (config.name == "rkv") return std::make_unique<RkvScorer>(config);
  if (config.name == "h2o") return std::make_unique<H2oScorer>();
  return absl::UnimplementedError(
      absl::StrCat("scorer.name \"", config.name, "\" is not implemented in this build yet"));
}

}  // namespace reasonalloc
