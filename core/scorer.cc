#include "core/scorer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/blas.h"

namespace reasonalloc {
namespace {

// SnapKV importance in its decode-time form (ALGORITHMS.md §2.1): group-reduced logits of the
// window queries, softmax over the candidates only, mean over the window, then 1-D pooling.
class SnapKvScorer final : public Scorer {
 public:
  explicit SnapKvScorer(const ScorerConfig& config) : config_(config) {}

  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const int cand = in.n - in.window;
    if (cand <= 0) return true;
    const int d = in.head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const int rows = in.group * in.window;
    // All window queries of the group against all candidates in one GEMM: [G·α, d] x [cand, d]^T.
    std::vector<float> all(static_cast<size_t>(rows) * static_cast<size_t>(cand));
    GemmABt(rows, cand, d, scale, in.queries, in.keys, all.data());
    std::vector<float> logits(static_cast<size_t>(cand));
    std::vector<float> importance(static_cast<size_t>(cand), 0.0f);
    for (int a = 0; a < in.window; ++a) {
      // GQA reduction on the logits, before the softmax (max or mean over the group).
      const float* first = all.data() + static_cast<size_t>(a) * cand;
      std::copy(first, first + cand, logits.begin());
      for (int g = 1; g < in.group; ++g) {
        const float* row = all.data() + (static_cast<size_t>(g) * in.window + a) * cand;
        if (config_.gqa_reduce == GqaReduce::kMax) {
          for (int j = 0; j < cand; ++j)
            logits[static_cast<size_t>(j)] = std::max(logits[static_cast<size_t>(j)], row[j]);
        } else {
          for (int j = 0; j < cand; ++j) logits[static_cast<size_t>(j)] += row[j];
        }
      }
      if (config_.gqa_reduce == GqaReduce::kMean) {
        const float inv_group = 1.0f / static_cast<float>(in.group);
        for (float& l : logits) l *= inv_group;
      }
      const float max_logit = *std::max_element(logits.begin(), logits.end());
      if (!std::isfinite(max_logit)) return false;
      float sum = 0.0f;
      for (float& l : logits) {
        l = std::exp(l - max_logit);
        sum += l;
      }
      const float inv = 1.0f / (sum * static_cast<float>(in.window));
      for (int j = 0; j < cand; ++j) {
        importance[static_cast<size_t>(j)] += logits[static_cast<size_t>(j)] * inv;
      }
    }
    Pool(importance, out);
    return true;
  }

  int64_t Work(const HeadInputs& in) const override {
    return int64_t{std::max(0, in.n - in.window)} * in.window * in.group * in.head_dim;
  }

 private:
  // Stride-1 pooling with kernel k and padding k/2: max pooling ignores the padding, average
  // pooling counts it as zeros and divides by k (PyTorch's avg_pool1d default).
  void Pool(const std::vector<float>& in, std::span<float> out) const {
    const int n = static_cast<int>(in.size());
    const int r = config_.pool_kernel / 2;
    for (int j = 0; j < n; ++j) {
      const int lo = std::max(0, j - r);
      const int hi = std::min(n - 1, j + r);
      if (config_.pool_kind == PoolKind::kMax) {
        float m = in[static_cast<size_t>(lo)];
        for (int i = lo + 1; i <= hi; ++i) m = std::max(m, in[static_cast<size_t>(i)]);
        out[static_cast<size_t>(j)] = m;
      } else {
        float s = 0.0f;
        for (int i = lo; i <= hi; ++i) s += in[static_cast<size_t>(i)];
        out[static_cast<size_t>(j)] = s / static_cast<float>(config_.pool_kernel);
      }
    }
  }

  ScorerConfig config_;
};

// R-KV (ALGORITHMS.md §2.4): SnapKV importance minus redundancy among the head's keys,
// Z = λ·I − (1 − λ)·R, where R is the softmax over all N keys of the mean cosine similarity of each
// key to the others (the newest near-duplicate of every key excluded from its row), sliced to
// candidates.
class RkvScorer final : public Scorer {
 public:
  explicit RkvScorer(const ScorerConfig& config) : snapkv_(config), config_(config) {}

  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const int n = in.n;
    const int cand = n - in.window;
    if (cand <= 0) return true;
    if (!snapkv_.ScoreHead(in, out)) return false;  // out = I
    const int d = in.head_dim;
    std::vector<float> kn(static_cast<size_t>(n) * static_cast<size_t>(d));
    for (int j = 0; j < n; ++j) {
      const float* k = in.keys + static_cast<int64_t>(j) * d;
      double norm = 0;
      for (int i = 0; i < d; ++i) norm += static_cast<double>(k[i]) * k[i];
      const float inv = 1.0f / (static_cast<float>(std::sqrt(norm)) + 1e-8f);
      for (int i = 0; i < d; ++i) kn[static_cast<size_t>(j) * d + i] = k[i] * inv;
    }
    // S is symmetric: SYRK computes the upper triangle once; mirror it and clear the diagonal.
    std::vector<float> s(static_cast<size_t>(n) * static_cast<size_t>(n), 0.0f);
    SyrkUpper(n, d, kn.data(), s.data());
    for (int i = 0; i < n; ++i) {
      s[static_cast<size_t>(i) * n + i] = 0.0f;
      for (int j = i + 1; j < n; ++j)
        s[static_cast<size_t>(j) * n + i] = s[static_cast<size_t>(i) * n + j];
    }
    const float threshold = static_cast<float>(config_.threshold);
    std::vector<double> col(static_cast<size_t>(n), 0.0);
    for (int i = 0; i < n; ++i) {
      const float* row = s.data() + static_cast<size_t>(i) * n;
      int last = -1;  // retain last: the newest near-duplicate of i is protected
      for (int j = n - 1; j >= 0; --j) {
        if (row[j] > threshold) {
          last = j;
          break;
        }
      }
      for (int j = 0; j < n; ++j) col[static_cast<size_t>(j)] += j == last ? 0.0f : row[j];
    }
    double max_mean = -1e300;
    for (double& c : col) {
      c /= n;
      max_mean = std::max(max_mean, c);
    }
    double z = 0;
    for (double c : col) z += std::exp(c - max_mean);
    const float lambda = static_cast<float>(config_.lambda);
    for (int j = 0; j < cand; ++j) {
      const float r = static_cast<float>(std::exp(col[static_cast<size_t>(j)] - max_mean) / z);
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

}  // namespace

absl::StatusOr<std::unique_ptr<Scorer>> MakeScorer(const ScorerConfig& config) {
  if (config.name == "snapkv") return std::make_unique<SnapKvScorer>(config);
  if (config.name == "streaming") return std::make_unique<StreamingScorer>();
  if (config.name == "rkv") return std::make_unique<RkvScorer>(config);
  return absl::UnimplementedError(
      absl::StrCat("scorer.name \"", config.name, "\" is not implemented in this build yet"));
}

}  // namespace reasonalloc
