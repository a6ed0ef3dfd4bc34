// SnapKV (docs/algorithms.md §2.1). The class is in this header because R-KV builds on it: its
// importance term is SnapKV's score (core/scorers/rkv.cc).
#ifndef REASONALLOC_CORE_SCORERS_SNAPKV_H_
#define REASONALLOC_CORE_SCORERS_SNAPKV_H_

#include <algorithm>
#include <cmath>
#include <span>

#include "core/blas.h"
#include "core/scorer.h"
#include "core/scorers/scorer_internal.h"
#include "core/softmax.h"

namespace reasonalloc::scorer_internal {

// How SnapKV lays out its logits for one head: in one block of G·α rows when it fits the tile,
// else in chunks of `chunk` window rows per group.
struct SnapKvPlan {
  int cand = 0;
  int cols = 0;
  bool whole = true;
  int chunk = 0;
  size_t bytes = 0;  // scratch the head needs
};

SnapKvPlan PlanSnapKv(const HeadInputs& in, bool softmax_all_keys);

// SnapKV importance in its decode-time form (docs/algorithms.md §2.1): window queries of the group
// against the keys, softmax, mean over the window, then 1-D pooling. The GQA reduction acts on the
// logits before the softmax (max, mean: R-KV) or on the pooled per-query-head scores after it
// (mean_scores: kvpress). The softmax runs over the candidates only (R-KV) or over all keys,
// causal inside the window (kvpress), then sliced to the candidates.
//
// Queries of the group are [G, α, d], so window rows a0 .. a0 + A of group g are contiguous: the
// tiled path computes them with one GEMM per (group, chunk) and folds the groups into one block,
// in the same order as the whole-block path.
class SnapKvScorer final : public Scorer {
 public:
  explicit SnapKvScorer(const ScorerConfig& config) : config_(config) {}

  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const bool ok = Score(in, out);
    ThreadScratch().Trim();
    return ok;
  }

  // The same without giving scratch back (R-KV calls it first and trims once at its end).
  bool Score(const HeadInputs& in, std::span<float> out) const {
    const SnapKvPlan plan = PlanSnapKv(in, config_.softmax_all_keys);
    const int cand = plan.cand;
    if (cand <= 0) return true;
    const int d = in.head_dim;
    const int cols = plan.cols;
    const size_t ucols = static_cast<size_t>(cols);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    Scratch& sc = ThreadScratch();
    float* importance = Sized(sc.importance, static_cast<size_t>(cand));
    const float inv_window = 1.0f / static_cast<float>(in.window);
    // The query of window row a sits at position cand + a and sees keys [0, cand + a].
    auto visible = [&](int a) { return config_.softmax_all_keys ? cand + a + 1 : cand; };
    auto group_rows = [&](int g, int a0) {
      return in.queries + (static_cast<int64_t>(g) * in.window + a0) * d;
    };

    if (plan.whole) {
      // All window queries of the group against the keys in one GEMM: [G·α, d] x [cols, d]^T.
      const int rows = in.group * in.window;
      float* all = Sized(sc.logits_all, static_cast<size_t>(rows) * ucols);
      GemmABt(rows, cols, d, scale, in.queries, in.keys, all);
      float* row = Sized(sc.row, ucols);
      if (config_.gqa_reduce == GqaReduce::kMeanScores) {
        std::fill(out.begin(), out.end(), 0.0f);
        float* pooled = Sized(sc.pooled, static_cast<size_t>(cand));
        const float inv_group = 1.0f / static_cast<float>(in.group);
        for (int g = 0; g < in.group; ++g) {
          std::fill(importance, importance + cand, 0.0f);
          for (int a = 0; a < in.window; ++a) {
            const int len = visible(a);
            std::copy_n(all + (static_cast<size_t>(g) * in.window + a) * ucols, len, row);
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
        std::copy_n(all + static_cast<size_t>(a) * ucols, len, row);
        for (int g = 1; g < in.group; ++g)
          Fold(all + (static_cast<size_t>(g) * in.window + a) * ucols, len, row);
        if (!ReduceAndSoftmax(row, len, in.group, inv_window)) return false;
        for (int j = 0; j < cand; ++j) importance[j] += row[j];
      }
      Pool(importance, cand, out.data());
      return true;
    }

    const int chunk = plan.chunk;
    float* block = Sized(sc.logits_all, static_cast<size_t>(chunk) * ucols);
    if (config_.gqa_reduce == GqaReduce::kMeanScores) {
      std::fill(out.begin(), out.end(), 0.0f);
      float* pooled = Sized(sc.pooled, static_cast<size_t>(cand));
      const float inv_group = 1.0f / static_cast<float>(in.group);
      for (int g = 0; g < in.group; ++g) {
        std::fill(importance, importance + cand, 0.0f);
        for (int a0 = 0; a0 < in.window; a0 += chunk) {
          if (Stopped(in)) return true;
          const int rows = std::min(chunk, in.window - a0);
          GemmABt(rows, cols, d, scale, group_rows(g, a0), in.keys, block);
          for (int r = 0; r < rows; ++r) {
            float* row = block + static_cast<size_t>(r) * ucols;
            const int len = visible(a0 + r);
            if (!SoftmaxInPlace(row, len, inv_window)) return false;
            for (int j = 0; j < cand; ++j) importance[j] += row[j];
          }
        }
        Pool(importance, cand, pooled);
        for (int j = 0; j < cand; ++j) out[static_cast<size_t>(j)] += pooled[j] * inv_group;
      }
      return true;
    }
    float* other = Sized(sc.tile, static_cast<size_t>(chunk) * ucols);
    std::fill(importance, importance + cand, 0.0f);
    for (int a0 = 0; a0 < in.window; a0 += chunk) {
      if (Stopped(in)) return true;
      const int rows = std::min(chunk, in.window - a0);
      GemmABt(rows, cols, d, scale, group_rows(0, a0), in.keys, block);
      for (int g = 1; g < in.group; ++g) {
        if (Stopped(in)) return true;
        GemmABt(rows, cols, d, scale, group_rows(g, a0), in.keys, other);
        for (int r = 0; r < rows; ++r) {
          Fold(other + static_cast<size_t>(r) * ucols, visible(a0 + r),
               block + static_cast<size_t>(r) * ucols);
        }
      }
      for (int r = 0; r < rows; ++r) {
        float* row = block + static_cast<size_t>(r) * ucols;
        const int len = visible(a0 + r);
        if (!ReduceAndSoftmax(row, len, in.group, inv_window)) return false;
        for (int j = 0; j < cand; ++j) importance[j] += row[j];
      }
    }
    Pool(importance, cand, out.data());
    return true;
  }

  int64_t Work(const HeadInputs& in) const override {
    const int cand = std::max(0, in.n - in.window);
    const int cols = config_.softmax_all_keys && cand > 0 ? in.n : cand;
    return int64_t{cols} * in.window * in.group * in.head_dim;
  }

  int64_t ScratchBytes(const HeadInputs& in) const override {
    return static_cast<int64_t>(PlanSnapKv(in, config_.softmax_all_keys).bytes);
  }

 private:
  // Folds another query head's logits into `row` (max or sum, by the GQA reduction).
  void Fold(const float* other, int len, float* row) const {
    if (config_.gqa_reduce == GqaReduce::kMax) {
      for (int j = 0; j < len; ++j) row[j] = std::max(row[j], other[j]);
    } else {
      for (int j = 0; j < len; ++j) row[j] += other[j];
    }
  }

  bool ReduceAndSoftmax(float* row, int len, int group, float inv_window) const {
    if (config_.gqa_reduce == GqaReduce::kMean) {
      const float inv_group = 1.0f / static_cast<float>(group);
      for (int j = 0; j < len; ++j) row[j] *= inv_group;
    }
    return SoftmaxInPlace(row, len, inv_window);
  }

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

}  // namespace reasonalloc::scorer_internal

#endif  // REASONALLOC_CORE_SCORERS_SNAPKV_H_
