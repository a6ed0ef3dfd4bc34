#include "core/engine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <new>

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
        absl::StrCat(in.fields.lengths, " has ", in.lengths.size(),
                     " entries; expected num_layers * num_kv_heads = ", heads));
  }
  for (int64_t i = 0; i < heads; ++i) {
    if (in.lengths[static_cast<size_t>(i)] < 0 || in.lengths[static_cast<size_t>(i)] > in.n_max) {
      return absl::InvalidArgumentError(absl::StrCat(in.fields.lengths, "[", i,
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
        in.fields.keys, ": this event needs ", work, " multiply-adds, above the limit of ",
        kMaxEventWork, "; send fewer tokens or a smaller query window"));
  }
  if (in.max_event_bytes > 0) {
    const uint64_t bytes = EventBytes(in);
    if (bytes > in.max_event_bytes) {
      int32_t longest = 0;
      for (int32_t n : in.lengths) longest = std::max(longest, n);
      return absl::ResourceExhaustedError(absl::StrCat(
          in.fields.keys, ": this event needs ", bytes, " bytes of scratch (", heads,
          " heads, the longest N = ", longest, " tokens, query window ", config_.budget.window,
          " × group ", m.group_size(), "), above the server's --max_event_bytes ",
          in.max_event_bytes, "; send fewer tokens per head"));
    }
  }
  return absl::OkStatus();
}

uint64_t Engine::EventBytes(const CompressInputs& in) const {
  const ModelGeometry& m = config_.model;
  const int64_t heads = m.num_heads_total();
  const int window = config_.budget.window;
  uint64_t per_event = 0;   // scores, kept indices, selection and pooling
  uint64_t per_thread = 0;  // the largest head's scorer scratch
  int64_t work = 0;
  uint64_t largest_layer = 0;  // candidates of one layer (the allocator's pooled threshold)
  uint64_t layer = 0;
  for (int64_t head = 0; head < heads; ++head) {
    HeadInputs hi;
    hi.n = in.lengths[static_cast<size_t>(head)];
    hi.group = m.group_size();
    hi.window = window;
    hi.head_dim = m.head_dim;
    const uint64_t n = static_cast<uint64_t>(std::max(0, hi.n));
    const uint64_t cand = static_cast<uint64_t>(std::max(0, hi.n - window));
    // A score per candidate and, at most, every row kept.
    per_event += cand * sizeof(float) + n * sizeof(int32_t);
    // The selector's (score, index) order and mark per candidate.
    per_thread = std::max<uint64_t>(
        per_thread, static_cast<uint64_t>(scorer_->ScratchBytes(hi)) + cand * (8 + 1));
    work += scorer_->Work(hi);
    layer += cand;
    if ((head + 1) % m.num_kv_heads == 0) {
      largest_layer = std::max(largest_layer, layer);
      layer = 0;
    }
  }
  per_event += largest_layer * sizeof(float);
  if (PolicyOf(config_.scorer.kind).needs_accumulator && in.accumulated == nullptr) {
    // The one-shot accumulator [L, Hkv, n_max] and its logits tile.
    per_event += static_cast<uint64_t>(heads) * static_cast<uint64_t>(in.n_max) * sizeof(float);
    const int n = static_cast<int>(in.n_max);
    per_thread = std::max<uint64_t>(per_thread, static_cast<uint64_t>(H2oChunkRows(n, window)) *
                                                    static_cast<uint64_t>(n) * sizeof(float));
  }
  const uint64_t threads =
      work >= kParallelWork && heads > 1
          ? static_cast<uint64_t>(std::min<int64_t>(heads, ThreadPool::Shared().size()))
          : 1;
  return per_event + threads * per_thread;
}

absl::StatusOr<Decision> Engine::Compress(const CompressInputs& in) const {
  // Memory is bounded before the event (max_event_bytes), but the process may still be short of
  // it: the caller gets RESOURCE_EXHAUSTED, never an exception.
  try {
    return Run(in);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(in.fields.keys,
                     ": the server ran out of memory while scoring this event; send fewer tokens "
                     "per head or retry later"));
  }
}

absl::StatusOr<Decision> Engine::Run(const CompressInputs& in) const {
  const ModelGeometry& m = config_.model;
  const int64_t heads = m.num_heads_total();
  const int window = config_.budget.window;
  const int group = m.group_size();
  const int d = m.head_dim;
  const int sinks = EffectiveSinks(config_);
  const int recent = EffectiveRecent(config_);
  if (auto status = CheckInputs(in); !status.ok()) return status;
  const auto t0 = std::chrono::steady_clock::now();
  Decision out;
  out.num_layers = m.num_layers;
  out.num_kv_heads = m.num_kv_heads;

  // h2o without a carried accumulator: a one-shot event over the window's attention.
  const float* accumulated = in.accumulated;
  std::vector<float> one_shot;
  double one_shot_seconds = 0;
  if (PolicyOf(config_.scorer.kind).needs_accumulator && accumulated == nullptr) {
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
  // Polled by the scorers between the tiles of a long head: one head's scoring can take seconds.
  const std::function<bool()> stop = [&] {
    if (cancelled.load(std::memory_order_relaxed)) return true;
    if (in.cancelled && in.cancelled()) cancelled.store(true);
    return cancelled.load();
  };
  auto score_head = [&](int64_t head) {
    if (cancelled.load(std::memory_order_relaxed)) return;
    HeadInputs hi = head_inputs(static_cast<int>(head / m.num_kv_heads),
                                static_cast<int>(head % m.num_kv_heads));
    hi.stop = &stop;
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
    ProtectScores(hi.n, window, sinks, recent, s);
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
      return absl::InvalidArgumentError(
          absl::StrCat(in.fields.queries, " and ", in.fields.keys,
                       ": attention logits overflow float32 in layer ", head / m.num_kv_heads,
                       ", kv head ", head % m.num_kv_heads, " (input magnitudes too large)"));
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
