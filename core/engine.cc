#include "core/engine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/h2o.h"
#include "core/selector.h"
#include "core/thread_pool.h"

namespace reasonalloc {
namespace {

// Below this many multiply-adds an event is scored on the calling thread.
constexpr int64_t kParallelWork = int64_t{1} << 21;

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int Decision::max_kept() const {
  int m = 0;
  for (int32_t k : kept_lengths) m = std::max(m, k);
  return m;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const SessionConfig& config,
                                                       std::vector<double> layer_demand) {
  if (auto s = ValidateSessionConfig(config); !s.ok()) return s;
  auto scorer = MakeScorer(config.scorer);
  if (!scorer.ok()) return scorer.status();
  auto allocator = MakeAllocator(config.allocator);
  if (!allocator.ok()) return allocator.status();
  // Bad profiles fail here, at session creation, not at the first event.
  if (auto layers = LayerBudgets(config, layer_demand); !layers.ok()) return layers.status();
  return std::unique_ptr<Engine>(new Engine(config, std::move(scorer).value(),
                                            std::move(allocator).value(), std::move(layer_demand)));
}

Engine::Engine(SessionConfig config, std::unique_ptr<Scorer> scorer,
               std::unique_ptr<Allocator> allocator, std::vector<double> layer_demand)
    : config_(std::move(config)),
      scorer_(std::move(scorer)),
      allocator_(std::move(allocator)),
      layer_demand_(std::move(layer_demand)) {}

absl::Status Engine::CheckInputs(const CompressInputs& in) const {
  const ModelGeometry& m = config_.model;
  const int64_t heads = m.num_heads_total();
  if (static_cast<int64_t>(in.lengths.size()) != heads) {
    return absl::InvalidArgumentError(
        absl::StrCat("lengths has ", in.lengths.size(),
                     " entries; expected num_layers * num_kv_heads = ", heads));
  }
  for (int64_t i = 0; i < heads; ++i) {
    if (in.lengths[static_cast<size_t>(i)] < 0 || in.lengths[static_cast<size_t>(i)] > in.n_max) {
      return absl::InvalidArgumentError(absl::StrCat("lengths[", i,
                                                     "] = ", in.lengths[static_cast<size_t>(i)],
                                                     " is out of range [0, ", in.n_max, "]"));
    }
  }
  int64_t work = 0;
  for (int64_t head = 0; head < heads; ++head) {
    HeadInputs hi;
    hi.n = in.lengths[static_cast<size_t>(head)];
    hi.group = m.group_size();
    hi.window = config_.budget.window;
    hi.head_dim = m.head_dim;
    work += scorer_->Work(hi);
  }
  if (work > kMaxEventWork) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "inline_tensors.keys: this event needs ", work, " multiply-adds, above the limit of ",
        kMaxEventWork, "; send fewer tokens or a smaller query window"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Decision> Engine::Compress(const CompressInputs& in) const {
  const ModelGeometry& m = config_.model;
  const int64_t heads = m.num_heads_total();
  const int window = config_.budget.window;
  const int group = m.group_size();
  const int d = m.head_dim;
  if (auto status = CheckInputs(in); !status.ok()) return status;
  const auto t0 = std::chrono::steady_clock::now();
  Decision out;
  out.num_layers = m.num_layers;
  out.num_kv_heads = m.num_kv_heads;

  // h2o without a carried accumulator: a one-shot event over the window's attention.
  const float* accumulated = in.accumulated;
  std::vector<float> one_shot;
  double one_shot_seconds = 0;
  if (config_.scorer.name == "h2o" && accumulated == nullptr) {
    const auto ta = std::chrono::steady_clock::now();
    auto acc = H2oAccumulator(m, window).Prepare(in, nullptr, 0);
    if (!acc.ok()) return acc.status();
    one_shot = std::move(acc).value();
    accumulated = one_shot.data();
    one_shot_seconds = SecondsSince(ta);
  }
  auto head_inputs = [&](int l, int h) {
    const int64_t head = int64_t{l} * m.num_kv_heads + h;
    HeadInputs hi;
    hi.queries = in.query_window + ((int64_t{l} * m.num_q_heads + int64_t{h} * group) * window) * d;
    hi.keys = in.keys + head * in.n_max * d;
    hi.n = in.lengths[static_cast<size_t>(head)];
    hi.group = group;
    hi.window = window;
    hi.head_dim = d;
    hi.sinks = config_.budget.sinks;
    if (accumulated != nullptr) hi.accumulated = accumulated + head * in.n_max;
    return hi;
  };
  int64_t work = 0;
  for (int64_t head = 0; head < heads; ++head) {
    work += scorer_->Work(head_inputs(static_cast<int>(head / m.num_kv_heads),
                                      static_cast<int>(head % m.num_kv_heads)));
  }

  // Heads are scored independently: on the shared pool when the event is big enough to repay the
  // hand-off (a few µs per head), inline otherwise. Results do not depend on which thread runs a
  // head.
  std::vector<std::vector<float>> scores(static_cast<size_t>(heads));
  std::vector<char> overflow(static_cast<size_t>(heads), 0);
  std::atomic<int64_t> unpolled_work{0};
  std::atomic<bool> cancelled{false};
  auto score_head = [&](int64_t head) {
    if (cancelled.load(std::memory_order_relaxed)) return;
    const HeadInputs hi = head_inputs(static_cast<int>(head / m.num_kv_heads),
                                      static_cast<int>(head % m.num_kv_heads));
    const int64_t w = scorer_->Work(hi);
    if (in.cancelled && unpolled_work.fetch_add(w) + w >= in.cancel_poll_work) {
      unpolled_work.store(0);
      if (in.cancelled()) {
        cancelled.store(true);
        return;
      }
    }
    auto& s = scores[static_cast<size_t>(head)];
    s.assign(static_cast<size_t>(std::max(0, hi.n - window)), 0.0f);
    if (!s.empty() && !scorer_->ScoreHead(hi, s)) overflow[static_cast<size_t>(head)] = 1;
  };
  auto t = std::chrono::steady_clock::now();
  if (work >= kParallelWork && heads > 1) {
    ThreadPool::Shared().ParallelFor(heads, score_head);
  } else {
    for (int64_t head = 0; head < heads; ++head) score_head(head);
  }
  if (cancelled.load()) {
    return absl::CancelledError("the compression event was cancelled (caller gone or drain)");
  }
  for (int64_t head = 0; head < heads; ++head) {
    if (overflow[static_cast<size_t>(head)]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "inline_tensors.query_window and inline_tensors.keys: attention logits overflow float32 "
          "in layer ",
          head / m.num_kv_heads, ", kv head ", head % m.num_kv_heads,
          " (input magnitudes too large)"));
    }
  }
  out.seconds.score = SecondsSince(t) + one_shot_seconds;

  t = std::chrono::steady_clock::now();
  out.budgets.assign(static_cast<size_t>(heads), 0);
  AllocationInputs ai{&config_, in.lengths, scores, layer_demand_};
  if (auto s = allocator_->Allocate(ai, out.budgets); !s.ok()) return s;
  out.seconds.allocate = SecondsSince(t);

  t = std::chrono::steady_clock::now();
  out.kept_lengths.assign(static_cast<size_t>(heads), 0);
  out.head_offsets.assign(static_cast<size_t>(heads) + 1, 0);
  for (int64_t head = 0; head < heads; ++head) {
    const int n = in.lengths[static_cast<size_t>(head)];
    const int kept = KeptCount(n, out.budgets[static_cast<size_t>(head)]);
    out.kept_lengths[static_cast<size_t>(head)] = kept;
    out.head_offsets[static_cast<size_t>(head) + 1] =
        out.head_offsets[static_cast<size_t>(head)] + kept;
    out.evicted_tokens += n - kept;
  }
  out.kept_indices.resize(static_cast<size_t>(out.head_offsets.back()));
  auto select_head = [&](int64_t head) {
    SelectHeadInto(scores[static_cast<size_t>(head)], in.lengths[static_cast<size_t>(head)],
                   out.budgets[static_cast<size_t>(head)], window,
                   out.kept_indices.data() + out.head_offsets[static_cast<size_t>(head)]);
  };
  // Selection is O(N) per head; worth the pool only for big events.
  if (out.head_offsets.back() >= (int64_t{1} << 16) && heads > 1) {
    ThreadPool::Shared().ParallelFor(heads, select_head);
  } else {
    for (int64_t head = 0; head < heads; ++head) select_head(head);
  }
  out.seconds.select = SecondsSince(t);
  out.seconds.total = SecondsSince(t0);
  return out;
}

Decision KeepAll(int num_layers, int num_kv_heads, std::span<const int32_t> lengths) {
  Decision d;
  d.num_layers = num_layers;
  d.num_kv_heads = num_kv_heads;
  d.budgets.assign(lengths.begin(), lengths.end());
  d.kept_lengths.assign(lengths.begin(), lengths.end());
  d.head_offsets.push_back(0);
  for (int32_t n : lengths) {
    for (int32_t j = 0; j < n; ++j) d.kept_indices.push_back(j);
    d.head_offsets.push_back(d.head_offsets.back() + n);
  }
  return d;
}

int WordsPerHead(int64_t n_max) { return static_cast<int>((n_max + 63) / 64); }

std::vector<uint64_t> BuildKeepMask(const Decision& decision, int64_t n_max) {
  const int words = WordsPerHead(n_max);
  const int64_t heads = static_cast<int64_t>(decision.kept_lengths.size());
  std::vector<uint64_t> mask(static_cast<size_t>(heads * words), 0);
  for (int64_t head = 0; head < heads; ++head) {
    uint64_t* w = mask.data() + head * words;
    for (int32_t j : decision.Kept(head)) w[j / 64] |= uint64_t{1} << (j % 64);
  }
  return mask;
}

void GatherKeptRows(const Decision& decision, const void* src, int64_t n_max, size_t row_bytes,
                    int64_t max_kept, void* dst) {
  const auto* s = static_cast<const unsigned char*>(src);
  auto* o = static_cast<unsigned char*>(dst);
  const int64_t heads = static_cast<int64_t>(decision.kept_lengths.size());
  for (int64_t head = 0; head < heads; ++head) {
    const unsigned char* hs = s + static_cast<size_t>(head * n_max) * row_bytes;
    unsigned char* hd = o + static_cast<size_t>(head * max_kept) * row_bytes;
    int64_t r = 0;
    for (int32_t j : decision.Kept(head)) {
      std::memcpy(hd + static_cast<size_t>(r++) * row_bytes,
                  hs + static_cast<size_t>(j) * row_bytes, row_bytes);
    }
    std::memset(hd + static_cast<size_t>(r) * row_bytes, 0,
                static_cast<size_t>(max_kept - r) * row_bytes);
  }
}

}  // namespace reasonalloc
