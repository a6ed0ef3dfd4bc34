#include "core/scorer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/blas.h"
#include "core/scratch.h"
#include "core/softmax.h"

namespace reasonalloc {

namespace {
std::atomic<size_t> g_tile_bytes{0};
constexpr size_t kDefaultTileBytes = size_t{16} << 20;
}  // namespace

size_t ScoreTileBytes() {
  const size_t t = g_tile_bytes.load(std::memory_order_relaxed);
  return t == 0 ? kDefaultTileBytes : t;
}

void SetScoreTileBytesForTesting(size_t bytes) {
  g_tile_bytes.store(bytes, std::memory_order_relaxed);
}

namespace {

// Per-thread scratch, reused across heads and events so that scoring allocates nothing in the
// steady state.
struct Scratch {
  std::vector<float> logits_all;   // [G·α, cols], or a tile [A, cols]
  std::vector<float> tile;         // [A, cols]: one group's rows while the tiled path folds groups
  std::vector<float> row;          // [cols]
  std::vector<float> importance;   // [cand]
  std::vector<float> pooled;       // [cand]
  std::vector<float> normalised;   // [n, d]
  std::vector<float> gram;         // [n, n] upper triangle, or a row tile [T, n - i0]
  std::vector<double> column;      // [n]
  std::vector<int> last_below;     // [n]
  std::vector<float> below_value;  // [n]

  void Trim() {
    TrimScratch(logits_all);
    TrimScratch(tile);
    TrimScratch(row);
    TrimScratch(importance);
    TrimScratch(pooled);
    TrimScratch(normalised);
    TrimScratch(gram);
    TrimScratch(column);
    TrimScratch(last_below);
    TrimScratch(below_value);
  }
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

constexpr size_t kF = sizeof(float);

bool Stopped(const HeadInputs& in) { return in.stop != nullptr && (*in.stop)(); }

// How SnapKV lays out its logits for one head: in one block of G·α rows when it fits the tile,
// else in chunks of `chunk` window rows per group.
struct SnapKvPlan {
  int cand = 0;
  int cols = 0;
  bool whole = true;
  int chunk = 0;
  size_t bytes = 0;  // scratch the head needs
};

SnapKvPlan PlanSnapKv(const HeadInputs& in, bool softmax_all_keys) {
  SnapKvPlan p;
  p.cand = std::max(0, in.n - in.window);
  if (p.cand == 0) return p;
  p.cols = softmax_all_keys ? in.n : p.cand;
  const size_t cols = static_cast<size_t>(p.cols);
  const size_t rows = static_cast<size_t>(in.group) * static_cast<size_t>(in.window);
  const size_t tile = ScoreTileBytes();
  // row, importance and pooled beside the logits.
  const size_t vectors = (cols + 2 * static_cast<size_t>(p.cand)) * kF;
  if (rows * cols * kF <= tile) {
    p.whole = true;
    p.chunk = in.window;
    p.bytes = rows * cols * kF + vectors;
  } else {
    p.whole = false;
    p.chunk = static_cast<int>(
        std::clamp<size_t>(tile / (2 * cols * kF), 1, static_cast<size_t>(in.window)));
    p.bytes = 2 * static_cast<size_t>(p.chunk) * cols * kF + vectors;
  }
  return p;
}

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

// StreamingLLM (docs/algorithms.md §2.3): newer tokens before older ones (its sinks are the
// engine's, ProtectScores). "Newer" is the age from the head's end: row j of a head of n rows
// scores -(n - 1 - j), so that heads of different lengths (ragged after any head-wise event)
// compare by recency when an allocator pools their candidates, not by row index.
class StreamingScorer final : public Scorer {
 public:
  bool ScoreHead(const HeadInputs& in, std::span<float> out) const override {
    const int cand = in.n - in.window;
    for (int j = 0; j < cand; ++j) out[static_cast<size_t>(j)] = static_cast<float>(j - (in.n - 1));
    return true;
  }
};

// H2O (docs/algorithms.md §2.2): the score is the attention each token has accumulated, which the
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

void ProtectScores(int n, int window, int sinks, int recent, std::span<float> scores) {
  const int cand = std::min(static_cast<int>(scores.size()), n - window);
  for (int j = std::max(0, n - recent); j < cand; ++j) {
    scores[static_cast<size_t>(j)] = kRecentScore - static_cast<float>(n - 1 - j);
  }
  for (int j = 0; j < std::min(sinks, cand); ++j) scores[static_cast<size_t>(j)] = kSinkScore;
}

}  // namespace reasonalloc
