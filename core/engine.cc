#include "core/engine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "core/arena_layout.h"
#include "core/check.h"
#include "core/compute_backend.h"
#include "core/h2o.h"
#include "core/selector.h"
#include "core/status_macros.h"
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
                                                       ProfileDemand demand) {
  if (auto s = ValidateSessionConfig(config); !s.ok()) return s;
  auto scorer = MakeScorer(config.scorer);
  if (!scorer.ok()) return scorer.status();
  // Bad profiles fail here, at session creation, not at the first event.
  if (auto s = CheckProfileDemand(config, demand); !s.ok()) return s;
  return std::unique_ptr<Engine>(new Engine(config, std::move(scorer).value(), std::move(demand)));
}

Engine::Engine(SessionConfig config, std::unique_ptr<Scorer> scorer, ProfileDemand demand)
    : config_(std::move(config)), scorer_(std::move(scorer)), demand_(std::move(demand)) {}

absl::Status CheckEventShape(const SessionConfig& config, const Scorer& scorer,
                             std::span<const int32_t> lengths, int64_t n_max,
                             const InputFields& fields) {
  const ModelGeometry& m = config.model;
  const int64_t heads = m.num_heads_total();
  if (static_cast<int64_t>(lengths.size()) != heads) {
    return absl::InvalidArgumentError(
        absl::StrCat(fields.lengths, " has ", lengths.size(),
                     " entries; expected num_layers * num_kv_heads = ", heads));
  }
  for (int64_t i = 0; i < heads; ++i) {
    if (lengths[static_cast<size_t>(i)] < 0 || lengths[static_cast<size_t>(i)] > n_max) {
      return absl::InvalidArgumentError(absl::StrCat(fields.lengths, "[", i,
                                                     "] = ", lengths[static_cast<size_t>(i)],
                                                     " is out of range [0, ", n_max, "]"));
    }
  }
  int64_t work = 0;
  for (int64_t head = 0; head < heads; ++head) {
    HeadInputs hi;
    hi.n = lengths[static_cast<size_t>(head)];
    hi.group = m.group_size();
    hi.window = config.budget.window;
    hi.head_dim = m.head_dim;
    work += scorer.Work(hi);
  }
  if (work > kMaxEventWork) {
    return absl::ResourceExhaustedError(absl::StrCat(
        fields.keys, ": this event needs ", work, " multiply-adds, above the limit of ",
        kMaxEventWork, "; send fewer tokens or a smaller query window"));
  }
  return absl::OkStatus();
}

absl::Status Engine::CheckInputs(const CompressInputs& in) const {
  const ModelGeometry& m = config_.model;
  const int64_t heads = m.num_heads_total();
  RETURN_IF_ERROR(CheckEventShape(config_, *scorer_, in.lengths, in.n_max, in.fields));
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

namespace {

// The CPU backend: the session's scorer per head (on the shared pool for big events), the pool
// counts from the scores, the selector per head. One event per batch.
class CpuBackend final : public ComputeBackend {
 public:
  CpuBackend(const SessionConfig& config, const Scorer& scorer, const CompressInputs& in,
             const float* accumulated)
      : config_(config), scorer_(scorer), in_(in), accumulated_(accumulated) {}

  absl::Status Score() override {
    const ModelGeometry& m = config_.model;
    const int64_t heads = m.num_heads_total();
    const int window = config_.budget.window;
    const int sinks = EffectiveSinks(config_);
    const int recent = EffectiveRecent(config_);
    int64_t work = 0;
    for (int64_t head = 0; head < heads; ++head) work += scorer_.Work(HeadAt(head));
    // Heads are scored independently: on the shared pool when the event is big enough to repay the
    // hand-off (a few µs per head), inline otherwise. Results do not depend on which thread runs
    // a head.
    scores_.assign(static_cast<size_t>(heads), {});
    std::vector<char> overflow(static_cast<size_t>(heads), 0);
    std::atomic<int64_t> unpolled_work{0};
    std::atomic<bool> cancelled{false};
    // Polled by the scorers between the tiles of a long head: one head's scoring can take seconds.
    const std::function<bool()> stop = [&] {
      if (cancelled.load(std::memory_order_relaxed)) return true;
      if (in_.cancelled && in_.cancelled()) cancelled.store(true);
      return cancelled.load();
    };
    auto score_head = [&](int64_t head) {
      if (cancelled.load(std::memory_order_relaxed)) return;
      HeadInputs hi = HeadAt(head);
      hi.stop = &stop;
      const int64_t w = scorer_.Work(hi);
      if (in_.cancelled && unpolled_work.fetch_add(w) + w >= in_.cancel_poll_work) {
        unpolled_work.store(0);
        if (in_.cancelled()) {
          cancelled.store(true);
          return;
        }
      }
      auto& s = scores_[static_cast<size_t>(head)];
      s.assign(static_cast<size_t>(std::max(0, hi.n - window)), 0.0f);
      if (!s.empty() && !scorer_.ScoreHead(hi, s)) overflow[static_cast<size_t>(head)] = 1;
      ProtectScores(hi.n, window, sinks, recent, s);
    };
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
            absl::StrCat(in_.fields.queries, " and ", in_.fields.keys,
                         ": attention logits overflow float32 in layer ", head / m.num_kv_heads,
                         ", kv head ", head % m.num_kv_heads, " (input magnitudes too large)"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status PoolCounts(std::span<const int64_t> k, std::span<int64_t> greater,
                          std::span<int64_t> equal) override {
    const size_t heads = static_cast<size_t>(config_.model.num_kv_heads);
    for (size_t l = 0; l < k.size(); ++l) {
      CountLayerPool(std::span<const std::vector<float>>(scores_).subspan(l * heads, heads), k[l],
                     greater.data() + l * heads, equal.data() + l * heads);
    }
    return absl::OkStatus();
  }

  absl::Status Select(std::span<Decision> decisions) override {
    Decision& out = decisions[0];
    const int64_t heads = config_.model.num_heads_total();
    auto select_head = [&](int64_t head) {
      SelectHeadInto(scores_[static_cast<size_t>(head)], in_.lengths[static_cast<size_t>(head)],
                     out.budgets[static_cast<size_t>(head)], config_.budget.window,
                     out.kept_indices.data() + out.head_offsets[static_cast<size_t>(head)]);
    };
    // Selection is O(N) per head; worth the pool only for big events.
    if (out.head_offsets.back() >= (int64_t{1} << 16) && heads > 1) {
      ThreadPool::Shared().ParallelFor(heads, select_head);
    } else {
      for (int64_t head = 0; head < heads; ++head) select_head(head);
    }
    return absl::OkStatus();
  }

 private:
  HeadInputs HeadAt(int64_t head) const {
    const ModelGeometry& m = config_.model;
    const int window = config_.budget.window;
    const int group = m.group_size();
    const int d = m.head_dim;
    const int64_t l = head / m.num_kv_heads, h = head % m.num_kv_heads;
    HeadInputs hi;
    hi.queries = in_.query_window + ((l * m.num_q_heads + h * group) * window) * d;
    hi.keys = in_.keys + head * in_.n_max * d;
    hi.n = in_.lengths[static_cast<size_t>(head)];
    hi.group = group;
    hi.window = window;
    hi.head_dim = d;
    if (accumulated_ != nullptr) hi.accumulated = accumulated_ + head * in_.n_max;
    return hi;
  }

  const SessionConfig& config_;
  const Scorer& scorer_;
  const CompressInputs& in_;
  const float* accumulated_;
  std::vector<std::vector<float>> scores_;
};

}  // namespace

absl::StatusOr<std::vector<Decision>> RunBatch(const SessionConfig& config,
                                               const ProfileDemand& demand,
                                               std::span<const std::span<const int32_t>> lengths,
                                               ComputeBackend& backend) {
  const ModelGeometry& m = config.model;
  const int64_t hl = m.num_heads_total();
  const size_t events = lengths.size();
  const auto t0 = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(backend.Score());
  const double score_seconds = SecondsSince(t0);

  auto t = std::chrono::steady_clock::now();
  std::vector<Decision> out(events);
  const std::span<const double> layer_demand = demand.layers;
  const bool routes = UsesPoolCounts(config);
  const bool static_heads = UsesHeadProfile(config);
  REASONALLOC_DCHECK(!(routes && static_heads));
  std::vector<int64_t> greater, equal;
  if (routes) {
    ASSIGN_OR_RETURN(const std::vector<int64_t> k, PoolSizes(config, layer_demand));
    greater.assign(events * static_cast<size_t>(hl), 0);
    equal.assign(events * static_cast<size_t>(hl), 0);
    RETURN_IF_ERROR(backend.PoolCounts(k, greater, equal));
  }
  std::vector<int32_t> layers;
  if (!routes && !static_heads) {
    ASSIGN_OR_RETURN(layers, LayerBudgets(config, layer_demand));
  }
  for (size_t e = 0; e < events; ++e) {
    Decision& dec = out[e];
    dec.num_layers = m.num_layers;
    dec.num_kv_heads = m.num_kv_heads;
    dec.budgets.assign(static_cast<size_t>(hl), 0);
    if (routes) {
      const size_t first = e * static_cast<size_t>(hl);
      RETURN_IF_ERROR(RouteFromPoolCounts(
          config, lengths[e], layer_demand,
          std::span<const int64_t>(greater).subspan(first, static_cast<size_t>(hl)),
          std::span<const int64_t>(equal).subspan(first, static_cast<size_t>(hl)), dec.budgets));
    } else if (static_heads) {
      RETURN_IF_ERROR(
          HeadBudgetsFromProfile(config, lengths[e], layer_demand, demand.heads, dec.budgets));
    } else {
      for (int64_t head = 0; head < hl; ++head) {
        dec.budgets[static_cast<size_t>(head)] = layers[static_cast<size_t>(head / m.num_kv_heads)];
      }
    }
  }
  const double allocate_seconds = SecondsSince(t);

  // Selection: each head's kept count and the decision's offsets, then the backend's positions.
  t = std::chrono::steady_clock::now();
  for (size_t e = 0; e < events; ++e) {
    Decision& dec = out[e];
    dec.kept_lengths.assign(static_cast<size_t>(hl), 0);
    dec.head_offsets.assign(static_cast<size_t>(hl) + 1, 0);
    for (int64_t head = 0; head < hl; ++head) {
      const int n = lengths[e][static_cast<size_t>(head)];
      const int kept = KeptCount(n, dec.budgets[static_cast<size_t>(head)]);
      dec.kept_lengths[static_cast<size_t>(head)] = kept;
      dec.head_offsets[static_cast<size_t>(head) + 1] =
          dec.head_offsets[static_cast<size_t>(head)] + kept;
      dec.evicted_tokens += n - kept;
    }
    dec.kept_indices.resize(static_cast<size_t>(dec.head_offsets.back()));
  }
  RETURN_IF_ERROR(backend.Select(out));
  const double select_seconds = SecondsSince(t);
  const double total_seconds = SecondsSince(t0);
  for (Decision& dec : out) {
    dec.seconds.score = score_seconds;
    dec.seconds.allocate = allocate_seconds;
    dec.seconds.select = select_seconds;
    dec.seconds.total = total_seconds;
  }
  return out;
}

absl::StatusOr<Decision> Engine::Run(const CompressInputs& in) const {
  const ModelGeometry& m = config_.model;
  RETURN_IF_ERROR(CheckInputs(in));
  const auto t0 = std::chrono::steady_clock::now();
  // h2o without a carried accumulator: a one-shot event over the window's attention.
  const float* accumulated = in.accumulated;
  std::vector<float> one_shot;
  double one_shot_seconds = 0;
  if (PolicyOf(config_.scorer.kind).needs_accumulator && accumulated == nullptr) {
    const auto ta = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(one_shot, H2oAccumulator(m, config_.budget.window).Prepare(in, nullptr, 0));
    accumulated = one_shot.data();
    one_shot_seconds = SecondsSince(ta);
  }
  CpuBackend backend(config_, *scorer_, in, accumulated);
  const std::span<const int32_t> lengths = in.lengths;
  ASSIGN_OR_RETURN(
      std::vector<Decision> decisions,
      RunBatch(config_, demand_, std::span<const std::span<const int32_t>>(&lengths, 1), backend));
  Decision out = std::move(decisions[0]);
  out.seconds.score += one_shot_seconds;
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

absl::Status HostCompactor::CompactInPlace(const Decision& decision,
                                           std::span<const int64_t> old_offsets,
                                           std::span<const int64_t> new_offsets, size_t row_bytes,
                                           void* k, void* v) {
  // The scratch is the only allocation, and it happens before any row moves.
  reasonalloc::CompactInPlace(decision, old_offsets, new_offsets, row_bytes,
                              static_cast<unsigned char*>(k), static_cast<unsigned char*>(v),
                              &scratch_);
  return absl::OkStatus();
}

}  // namespace reasonalloc
