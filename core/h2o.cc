#include "core/h2o.h"

#include <algorithm>
#include <atomic>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/blas.h"
#include "core/scratch.h"
#include "core/softmax.h"
#include "core/thread_pool.h"

namespace reasonalloc {

bool AddWindowAttention(const float* queries, const float* keys, int n, int group, int window,
                        int head_dim, int first_row, float* acc) {
  first_row = std::max(first_row, window - n);  // rows before position 0 have no token
  if (n <= 0 || first_row >= window) return true;
  const int rows = window - first_row;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const float inv_group = 1.0f / static_cast<float>(group);
  // The new rows are taken a tile at a time, so that the logits stay within the scoring tile.
  const int chunk = H2oChunkRows(n, rows);
  thread_local std::vector<float> logits;
  float* block = Sized(logits, static_cast<size_t>(chunk) * static_cast<size_t>(n));
  bool ok = true;
  for (int g = 0; g < group && ok; ++g) {
    for (int r0 = 0; r0 < rows && ok; r0 += chunk) {
      const int count = std::min(chunk, rows - r0);
      // The group's new rows against every key in one GEMM; each row then masks its future.
      const float* q = queries + (static_cast<int64_t>(g) * window + first_row + r0) * head_dim;
      GemmABt(count, n, head_dim, scale, q, keys, block);
      for (int r = 0; r < count; ++r) {
        const int len = n - window + first_row + r0 + r + 1;  // the query's position + 1
        float* row = block + static_cast<size_t>(r) * static_cast<size_t>(n);
        if (!SoftmaxInPlace(row, len, inv_group)) {
          ok = false;
          break;
        }
        for (int j = 0; j < len; ++j) acc[j] += row[j];
      }
    }
  }
  TrimScratch(logits);
  return ok;
}

int H2oChunkRows(int n, int rows) {
  if (n <= 0 || rows <= 0) return 1;
  return static_cast<int>(std::clamp<size_t>(
      ScoreTileBytes() / (static_cast<size_t>(n) * sizeof(float)), 1, static_cast<size_t>(rows)));
}

H2oAccumulator::H2oAccumulator(const ModelGeometry& model, int window)
    : model_(model), window_(window), carried_(static_cast<size_t>(model.num_heads_total())) {}

absl::StatusOr<std::vector<float>> H2oAccumulator::Prepare(const CompressInputs& in,
                                                           const float* attention,
                                                           int64_t step) const {
  const int64_t heads = model_.num_heads_total();
  if (static_cast<int64_t>(in.lengths.size()) != heads) {
    return absl::InvalidArgumentError(
        absl::StrCat(in.fields.lengths, " has ", in.lengths.size(), " entries; expected ", heads));
  }
  for (int64_t head = 0; head < heads; ++head) {
    const int64_t n = in.lengths[static_cast<size_t>(head)];
    if (n < carried(head)) {
      return absl::FailedPreconditionError(absl::StrCat(
          in.fields.lengths, "[", head, "] = ", n, " is below the ", carried(head),
          " tokens the head kept at the last event; an h2o session's heads must start with the "
          "tokens they kept"));
    }
  }
  std::vector<float> acc(static_cast<size_t>(heads * in.n_max), 0.0f);
  if (attention != nullptr) {
    for (int64_t head = 0; head < heads; ++head) {
      const int64_t n = in.lengths[static_cast<size_t>(head)];
      const float* a = attention + head * in.n_max;
      for (int64_t j = 0; j < n; ++j) {
        if (!(a[j] >= 0.0f) || !std::isfinite(a[j])) {
          return absl::InvalidArgumentError(
              absl::StrCat(in.fields.attention, ": element ", head * in.n_max + j, " is ", a[j],
                           "; accumulated attention must be finite and non-negative"));
        }
      }
    }
  }
  // First window row that is new since the last event.
  const int first_row =
      has_step_ ? static_cast<int>(std::max<int64_t>(0, window_ - (step - last_step_))) : 0;
  const int group = model_.group_size();
  const int d = model_.head_dim;
  std::vector<char> overflow(static_cast<size_t>(heads), 0);
  std::atomic<bool> cancelled{false};
  auto fill = [&](int64_t head) {
    // Polled per head: the window's attention is most of an h2o event.
    if (cancelled.load(std::memory_order_relaxed)) return;
    if (in.cancelled && attention == nullptr && in.cancelled()) {
      cancelled.store(true);
      return;
    }
    const int n = in.lengths[static_cast<size_t>(head)];
    float* out = acc.data() + head * in.n_max;
    const auto& kept = carried_[static_cast<size_t>(head)];
    std::copy(kept.begin(), kept.end(), out);
    if (attention != nullptr) {
      const float* a = attention + head * in.n_max;
      for (int j = 0; j < n; ++j) out[j] += a[j];
      return;
    }
    const int64_t l = head / model_.num_kv_heads;
    const int64_t h = head % model_.num_kv_heads;
    const float* q = in.query_window + ((l * model_.num_q_heads + h * group) * window_) * d;
    const float* k = in.keys + head * in.n_max * d;
    if (!AddWindowAttention(q, k, n, group, window_, d, first_row, out)) {
      overflow[static_cast<size_t>(head)] = 1;
    }
  };
  const int64_t work = heads * window_ * group * in.n_max * d;
  if (attention == nullptr && work >= (int64_t{1} << 21) && heads > 1) {
    ThreadPool::Shared().ParallelFor(heads, fill);
  } else {
    for (int64_t head = 0; head < heads; ++head) fill(head);
  }
  if (cancelled.load()) {
    return absl::CancelledError("the compression event was cancelled (caller gone or drain)");
  }
  for (int64_t head = 0; head < heads; ++head) {
    if (overflow[static_cast<size_t>(head)]) {
      return absl::InvalidArgumentError(
          absl::StrCat(in.fields.queries, " and ", in.fields.keys,
                       ": attention logits overflow float32 in layer ", head / model_.num_kv_heads,
                       ", kv head ", head % model_.num_kv_heads));
    }
  }
  return acc;
}

void H2oAccumulator::Commit(const Decision& decision, const std::vector<float>& accumulated,
                            int64_t n_max, int64_t step) {
  const int64_t heads = model_.num_heads_total();
  for (int64_t head = 0; head < heads; ++head) {
    auto& kept = carried_[static_cast<size_t>(head)];
    kept.clear();
    const float* acc = accumulated.data() + head * n_max;
    for (int32_t j : decision.Kept(head)) kept.push_back(acc[j]);
  }
  has_step_ = true;
  last_step_ = step;
}

}  // namespace reasonalloc
