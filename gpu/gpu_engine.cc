#include "gpu/gpu_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/allocator.h"
#include "core/compute_backend.h"
#include "core/selector.h"
#include "core/status_macros.h"
#include "core/sync.h"
#include "gpu/cuda_status.h"
#include "gpu/gpu_launch.h"

namespace reasonalloc::gpu {
namespace {

namespace k = launch;

#define RA_CUDA(call)                                             \
  do {                                                            \
    if (auto _s = CudaStatus(#call, (call)); !_s.ok()) return _s; \
  } while (0)

// A grow-only device buffer.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  absl::Status Reserve(size_t bytes) {
    if (bytes <= size_) return absl::OkStatus();
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = 0;
    RA_CUDA(cudaMalloc(&ptr_, bytes));
    size_ = bytes;
    return absl::OkStatus();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

launch::Elem Elem(DType dtype) {
  return dtype == DType::kFloat16    ? launch::Elem::kF16
         : dtype == DType::kBFloat16 ? launch::Elem::kBF16
                                     : launch::Elem::kF32;
}

// An error of event `e` of the batch: its index as payload (EventIndexOf).
absl::Status ForEvent(absl::Status s, size_t e) {
  if (!s.ok()) s.SetPayload(kEventIndexPayload, absl::Cord(std::to_string(e)));
  return s;
}

// Scratch for the window logits of one scoring launch (1 GiB); bigger batches are scored in chunks.
constexpr long long kLogitsBytes = 1ll << 30;

}  // namespace

struct GpuEngine::Impl {
  int device = 0;
  SessionConfig config;
  ProfileDemand demand;
  std::unique_ptr<Scorer> scorer;  // the cost model of an event's work (CheckEventShape)
  cudaStream_t stream = nullptr;
  bool accumulated_given = false;  // h2o: this batch carries accumulators
  Mutex mu;                        // one batch, copy or compaction at a time on the stream

  DeviceBuffer heads, logits, importance, scores, overflow, inv, rowsum, partner, partner_value,
      column, pool_k_dev, greater, equal, budgets, offsets, kept, kept_lengths, mask, gather, bad,
      row_lists, scratch;

  // The last batch, for LastScores, LastKeepMask and GatherKept.
  std::vector<std::vector<int32_t>> last_lengths;
  std::vector<int64_t> last_n_max;
  std::vector<int64_t> last_max_kept;
  long long last_stride = 0;
  int last_words = 0;

  ~Impl() {
    if (stream != nullptr) {
      cudaSetDevice(device);
      cudaStreamDestroy(stream);
    }
  }

  absl::Status LaunchScoring(long long num_heads, long long stride);
  // Heads per scoring launch: all of them unless their window logits would pass kLogitsBytes.
  long long LogitsChunk(long long num_heads, long long stride) const {
    const long long per_head = logit_rows * stride * static_cast<long long>(sizeof(float));
    return std::clamp(logits_bytes / std::max(1ll, per_head), 1ll, std::max(1ll, num_heads));
  }
  long long logit_rows = 0;  // window, or G·window (mean_scores, one-shot h2o)
  long long logits_bytes = kLogitsBytes;
  absl::StatusOr<std::vector<Decision>> Compress(std::span<const DeviceEventInputs> events,
                                                 std::span<const std::string> names);
  // One batch as the compute backend's steps see it (core/compute_backend.h).
  struct BatchState {
    std::span<const DeviceEventInputs> events;
    std::function<std::string(size_t)> name;  // an event's name in errors
    long long stride = 1;                     // the largest n_max: rows per head in the scratch
    bool check_finite = false;
  };
  absl::Status ScoreBatch(const BatchState& b);
  absl::Status PoolCountsBatch(const BatchState& b, std::span<const int64_t> k,
                               std::span<int64_t> greater_out, std::span<int64_t> equal_out);
  absl::Status SelectBatch(const BatchState& b, std::span<Decision> decisions);
  // One event's checks, its fields named as DeviceEventInputs names them.
  absl::Status CheckEvent(const DeviceEventInputs& ev) const;
};

absl::Status GpuEngine::Impl::LaunchScoring(long long num_heads, long long stride) {
  const ModelGeometry& m = config.model;
  const ScorerConfig& sc = config.scorer;
  k::ScoringParams p;
  p.elem = Elem(m.dtype);
  p.group = m.group_size();
  p.window = config.budget.window;
  p.head_dim = m.head_dim;
  p.sinks = EffectiveSinks(config);
  p.recent = EffectiveRecent(config);
  p.lambda = static_cast<float>(sc.lambda);
  p.threshold = static_cast<float>(sc.threshold);
  switch (sc.kind) {
    case ScorerKind::kStreaming:
      p.scorer = k::Scorer::kStreaming;
      break;
    case ScorerKind::kH2o:
      // With a carried accumulator the scores are a copy; without one (one-shot) they are the
      // window's group-mean causal attention summed over the window (core/h2o.h): the mean-scores
      // path with softmax over all keys, row weight 1 and no pooling.
      p.scorer = accumulated_given ? k::Scorer::kH2oAccumulated : k::Scorer::kH2oWindow;
      p.all_keys = true;
      p.reduce = k::kReduceNone;
      p.row_weight = 1.0f;
      p.pool_kernel = 1;
      p.pool_max = true;
      break;
    case ScorerKind::kSnapKv:
    case ScorerKind::kRkv:
      p.scorer = sc.kind == ScorerKind::kRkv ? k::Scorer::kRkv : k::Scorer::kSnapKv;
      p.all_keys = sc.softmax_all_keys;
      p.reduce = sc.gqa_reduce == GqaReduce::kMeanScores ? k::kReduceNone
                 : sc.gqa_reduce == GqaReduce::kMean     ? k::kReduceMean
                                                         : k::kReduceMax;
      p.row_weight = 1.0f / static_cast<float>(p.window);
      p.pool_kernel = sc.pool_kernel;
      p.pool_max = sc.pool_kind == PoolKind::kMax;
      break;
  }
  // Heads go through in chunks whose logits fit the scratch (LogitsChunk); the per-head arrays
  // are offset, the logits reused.
  const long long chunk = LogitsChunk(num_heads, stride);
  for (long long h0 = 0; h0 < num_heads; h0 += chunk) {
    const long long at = h0 * stride;
    k::ScoringBuffers b;
    b.scores = scores.as<float>() + at;
    b.overflow = overflow.as<int>() + h0;
    b.logits = logits.as<float>();
    b.importance = importance.as<float>() == nullptr ? nullptr : importance.as<float>() + at;
    if (sc.kind == ScorerKind::kRkv) {
      b.inv_norm = inv.as<float>() + at;
      b.rowsum = rowsum.as<double>() + at;
      b.partner = partner.as<int>() + h0 * stride;
      b.partner_value = partner_value.as<float>() + at;
      b.column = column.as<double>() + at;
    }
    if (cudaError_t err = k::Scoring(p, heads.as<k::HeadDesc>() + h0,
                                     std::min(chunk, num_heads - h0), stride, b, stream);
        err != cudaSuccess) {
      return CudaStatus("scoring kernels", err);
    }
  }
  return absl::OkStatus();
}

namespace {

// The CUDA compute backend of RunBatch: the engine's kernels on its stream.
class GpuBackend final : public ComputeBackend {
 public:
  GpuBackend(GpuEngine::Impl& impl, const GpuEngine::Impl::BatchState& batch)
      : impl_(impl), batch_(batch) {}
  absl::Status Score() override { return impl_.ScoreBatch(batch_); }
  absl::Status PoolCounts(std::span<const int64_t> k, std::span<int64_t> greater,
                          std::span<int64_t> equal) override {
    return impl_.PoolCountsBatch(batch_, k, greater, equal);
  }
  absl::Status Select(std::span<Decision> decisions) override {
    return impl_.SelectBatch(batch_, decisions);
  }

 private:
  GpuEngine::Impl& impl_;
  const GpuEngine::Impl::BatchState& batch_;
};

}  // namespace

absl::Status GpuEngine::Impl::CheckEvent(const DeviceEventInputs& ev) const {
  const int window = config.budget.window;
  const long long hl = config.model.num_heads_total();
  if (ev.keys == nullptr || ev.query_window == nullptr) {
    return absl::InvalidArgumentError("keys and query_window must be device pointers");
  }
  if (ev.n_max <= 0 || ev.n_max > kMaxContext) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_max = ", ev.n_max, " is out of range [1, ", kMaxContext, "]"));
  }
  // The shape checks every backend makes, naming DeviceEventInputs' fields.
  RETURN_IF_ERROR(CheckEventShape(config, *scorer, ev.lengths, ev.n_max,
                                  InputFields{"keys", "query_window", "lengths", "accumulated"}));
  if (!ev.head_row_offsets.empty()) {
    if (static_cast<long long>(ev.head_row_offsets.size()) != hl) {
      return absl::InvalidArgumentError(
          absl::StrCat("head_row_offsets has ", ev.head_row_offsets.size(),
                       " entries; expected num_layers * num_kv_heads = ", hl));
    }
    for (int64_t o : ev.head_row_offsets) {
      if (o < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("head_row_offsets holds a negative row ", o));
      }
    }
  }
  if (ev.ring_start < 0 || ev.ring_start >= window) {
    return absl::InvalidArgumentError(
        absl::StrCat("ring_start = ", ev.ring_start, " is outside [0, window ", window, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Decision>> GpuEngine::Impl::Compress(
    std::span<const DeviceEventInputs> events, std::span<const std::string> names) {
  auto event_name = [&](size_t e) {
    return e < names.size() ? names[e] : absl::StrCat("events[", e, "]");
  };
  const ModelGeometry& m = config.model;
  if (events.empty()) return absl::InvalidArgumentError("events is empty");
  long long stride = 1;
  bool acc_given = false;
  bool check_finite = false;
  for (size_t e = 0; e < events.size(); ++e) {
    const DeviceEventInputs& ev = events[e];
    RETURN_IF_ERROR(ForEvent(WithContext(CheckEvent(ev), event_name(e)), e));
    check_finite |= ev.check_finite;
    if (e > 0 && (ev.accumulated != nullptr) != acc_given) {
      return absl::InvalidArgumentError(
          "events: either every event carries an h2o accumulator or none does");
    }
    acc_given = ev.accumulated != nullptr;
    stride = std::max<long long>(stride, ev.n_max);
  }
  if (static_cast<long long>(m.num_kv_heads) * stride >= (1ll << 31)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.num_kv_heads × n_max = ", static_cast<long long>(m.num_kv_heads) * stride,
        " exceeds the CUDA backend's 2^31 candidates per layer"));
  }
  accumulated_given = acc_given;
  // From here on the device buffers change: a batch that fails leaves no "last batch" behind.
  last_lengths.clear();
  last_n_max.clear();
  last_max_kept.clear();
  last_stride = 0;
  const long long num_events = static_cast<long long>(events.size());
  RA_CUDA(cudaSetDevice(device));
  BatchState b{events, event_name, stride, check_finite};
  GpuBackend backend(*this, b);
  std::vector<std::span<const int32_t>> lengths;
  for (const DeviceEventInputs& ev : events) lengths.push_back(ev.lengths);
  ASSIGN_OR_RETURN(std::vector<Decision> out, RunBatch(config, demand, lengths, backend));
  for (long long e = 0; e < num_events; ++e) {
    const auto& ev = events[static_cast<size_t>(e)];
    last_lengths.emplace_back(ev.lengths.begin(), ev.lengths.end());
    last_n_max.push_back(ev.n_max);
    last_max_kept.push_back(out[static_cast<size_t>(e)].max_kept());
  }
  last_stride = stride;
  last_words = WordsPerHead(stride);
  return out;
}

absl::Status GpuEngine::Impl::ScoreBatch(const BatchState& b) {
  const std::span<const DeviceEventInputs> events = b.events;
  const ModelGeometry& m = config.model;
  const int window = config.budget.window;
  const int group = m.group_size();
  const int d = m.head_dim;
  const long long hl = m.num_heads_total();
  const size_t esize = DTypeSize(m.dtype);
  const long long num_events = static_cast<long long>(events.size());
  const long long num_heads = num_events * hl;
  const long long stride = b.stride;
  // Head descriptors.
  std::vector<k::HeadDesc> hd(static_cast<size_t>(num_heads));
  for (long long e = 0; e < num_events; ++e) {
    const DeviceEventInputs& ev = events[static_cast<size_t>(e)];
    for (long long head = 0; head < hl; ++head) {
      const long long l = head / m.num_kv_heads, h = head % m.num_kv_heads;
      k::HeadDesc& x = hd[static_cast<size_t>(e * hl + head)];
      x.queries = static_cast<const unsigned char*>(ev.query_window) +
                  ((l * m.num_q_heads + h * group) * window) * d * static_cast<long long>(esize);
      const long long row0 = ev.head_row_offsets.empty()
                                 ? head * ev.n_max
                                 : ev.head_row_offsets[static_cast<size_t>(head)];
      x.keys =
          static_cast<const unsigned char*>(ev.keys) + row0 * d * static_cast<long long>(esize);
      x.accumulated = ev.accumulated != nullptr ? ev.accumulated + row0 : nullptr;
      x.n = ev.lengths[static_cast<size_t>(head)];
      x.ring_start = ev.ring_start;
    }
  }
  const ScorerConfig& sc = config.scorer;
  const bool h2o_one_shot = sc.kind == ScorerKind::kH2o && !accumulated_given;
  const bool logit_scorer =
      PolicyOf(sc.kind).uses_queries && (sc.kind != ScorerKind::kH2o || h2o_one_shot);
  const long long rows =
      (h2o_one_shot || sc.gqa_reduce == GqaReduce::kMeanScores) ? 1ll * group * window : window;
  const size_t hs = static_cast<size_t>(num_heads) * static_cast<size_t>(stride);
  if (auto s = heads.Reserve(sizeof(k::HeadDesc) * hd.size()); !s.ok()) return s;
  if (auto s = scores.Reserve(sizeof(float) * hs); !s.ok()) return s;
  if (auto s = overflow.Reserve(sizeof(int) * static_cast<size_t>(num_heads)); !s.ok()) return s;
  logit_rows = logit_scorer ? rows : 0;
  if (logit_scorer) {
    const long long chunk = LogitsChunk(num_heads, stride);
    if (auto s = logits.Reserve(sizeof(float) * static_cast<size_t>(chunk * rows * stride));
        !s.ok()) {
      return s;
    }
    if (auto s = importance.Reserve(sizeof(float) * hs); !s.ok()) return s;
  }
  if (sc.kind == ScorerKind::kRkv) {
    if (auto s = inv.Reserve(sizeof(float) * hs); !s.ok()) return s;
    if (auto s = rowsum.Reserve(sizeof(double) * hs); !s.ok()) return s;
    if (auto s = partner.Reserve(sizeof(int) * hs); !s.ok()) return s;
    if (auto s = partner_value.Reserve(sizeof(float) * hs); !s.ok()) return s;
    if (auto s = column.Reserve(sizeof(double) * hs); !s.ok()) return s;
  }
  RA_CUDA(cudaMemcpyAsync(heads.as<void>(), hd.data(), sizeof(k::HeadDesc) * hd.size(),
                          cudaMemcpyHostToDevice, stream));
  RA_CUDA(cudaMemsetAsync(overflow.as<void>(), 0, sizeof(int) * static_cast<size_t>(num_heads),
                          stream));

  if (b.check_finite) {
    if (auto s = bad.Reserve(sizeof(int) * static_cast<size_t>(num_heads)); !s.ok()) return s;
    RA_CUDA(
        cudaMemsetAsync(bad.as<void>(), 0, sizeof(int) * static_cast<size_t>(num_heads), stream));
    RA_CUDA(k::CheckFinite(Elem(m.dtype), heads.as<k::HeadDesc>(), num_heads, group, window, d,
                           bad.as<int>(), stream));
  }
  if (auto s = LaunchScoring(num_heads, stride); !s.ok()) return s;

  std::vector<int> overflow_h(static_cast<size_t>(num_heads));
  RA_CUDA(cudaMemcpyAsync(overflow_h.data(), overflow.as<void>(), sizeof(int) * overflow_h.size(),
                          cudaMemcpyDeviceToHost, stream));
  std::vector<int> bad_h(b.check_finite ? static_cast<size_t>(num_heads) : 0);
  if (b.check_finite) {
    RA_CUDA(cudaMemcpyAsync(bad_h.data(), bad.as<void>(), sizeof(int) * bad_h.size(),
                            cudaMemcpyDeviceToHost, stream));
  }
  RA_CUDA(cudaStreamSynchronize(stream));
  for (size_t gh = 0; gh < bad_h.size(); ++gh) {
    // Only events that asked for the check are judged by it.
    if (bad_h[gh] != 0 && events[gh / static_cast<size_t>(hl)].check_finite) {
      const long long head = static_cast<long long>(gh) % hl;
      return ForEvent(absl::InvalidArgumentError(
                          absl::StrCat(b.name(gh / static_cast<size_t>(hl)),
                                       ": keys or query_window hold NaN or Inf in layer ",
                                       head / m.num_kv_heads, ", kv head ", head % m.num_kv_heads)),
                      gh / static_cast<size_t>(hl));
    }
  }
  for (long long gh = 0; gh < num_heads; ++gh) {
    if (overflow_h[static_cast<size_t>(gh)] != 0) {
      const long long head = gh % hl;
      return ForEvent(absl::InvalidArgumentError(absl::StrCat(
                          b.name(static_cast<size_t>(gh / hl)),
                          ": query_window and keys: attention logits overflow float32 in layer ",
                          head / m.num_kv_heads, ", kv head ", head % m.num_kv_heads,
                          " (input magnitudes too large)")),
                      static_cast<size_t>(gh / hl));
    }
  }
  return absl::OkStatus();
}

absl::Status GpuEngine::Impl::PoolCountsBatch(const BatchState& b,
                                              std::span<const int64_t> k_layers,
                                              std::span<int64_t> greater_out,
                                              std::span<int64_t> equal_out) {
  const std::span<const DeviceEventInputs> events = b.events;
  const ModelGeometry& m = config.model;
  const int window = config.budget.window;
  const long long hl = m.num_heads_total();
  const long long num_events = static_cast<long long>(events.size());
  const long long num_heads = num_events * hl;
  const long long stride = b.stride;
  if (auto s = pool_k_dev.Reserve(sizeof(long long) * k_layers.size()); !s.ok()) return s;
  if (auto s = greater.Reserve(sizeof(long long) * static_cast<size_t>(num_heads)); !s.ok()) {
    return s;
  }
  if (auto s = equal.Reserve(sizeof(long long) * static_cast<size_t>(num_heads)); !s.ok()) {
    return s;
  }
  const std::vector<long long> pk(k_layers.begin(), k_layers.end());
  RA_CUDA(cudaMemcpyAsync(pool_k_dev.as<void>(), pk.data(), sizeof(long long) * pk.size(),
                          cudaMemcpyHostToDevice, stream));
  RA_CUDA(k::LayerPool(heads.as<k::HeadDesc>(), num_events, m.num_layers, m.num_kv_heads, window,
                       stride, scores.as<float>(), pool_k_dev.as<long long>(),
                       greater.as<long long>(), equal.as<long long>(), stream));
  std::vector<long long> greater_h(static_cast<size_t>(num_heads)),
      equal_h(static_cast<size_t>(num_heads));
  RA_CUDA(cudaMemcpyAsync(greater_h.data(), greater.as<void>(),
                          sizeof(long long) * greater_h.size(), cudaMemcpyDeviceToHost, stream));
  RA_CUDA(cudaMemcpyAsync(equal_h.data(), equal.as<void>(), sizeof(long long) * equal_h.size(),
                          cudaMemcpyDeviceToHost, stream));
  RA_CUDA(cudaStreamSynchronize(stream));
  std::copy(greater_h.begin(), greater_h.end(), greater_out.begin());
  std::copy(equal_h.begin(), equal_h.end(), equal_out.begin());
  return absl::OkStatus();
}

absl::Status GpuEngine::Impl::SelectBatch(const BatchState& b, std::span<Decision> decisions) {
  const std::span<const DeviceEventInputs> events = b.events;
  const ModelGeometry& m = config.model;
  const int window = config.budget.window;
  const long long hl = m.num_heads_total();
  const long long num_events = static_cast<long long>(events.size());
  const long long num_heads = num_events * hl;
  const long long stride = b.stride;
  std::vector<int> budgets_h(static_cast<size_t>(num_heads));
  std::vector<long long> offsets_h(static_cast<size_t>(num_heads) + 1, 0);
  std::vector<int> kept_lengths_h(static_cast<size_t>(num_heads));
  for (long long e = 0; e < num_events; ++e) {
    const Decision& dec = decisions[static_cast<size_t>(e)];
    for (long long head = 0; head < hl; ++head) {
      const size_t gh = static_cast<size_t>(e * hl + head);
      budgets_h[gh] = dec.budgets[static_cast<size_t>(head)];
      kept_lengths_h[gh] = dec.kept_lengths[static_cast<size_t>(head)];
      offsets_h[gh + 1] = offsets_h[gh] + kept_lengths_h[gh];
    }
  }
  const int words = WordsPerHead(stride);
  const size_t total_kept = static_cast<size_t>(offsets_h.back());
  if (auto s = budgets.Reserve(sizeof(int) * budgets_h.size()); !s.ok()) return s;
  if (auto s = offsets.Reserve(sizeof(long long) * offsets_h.size()); !s.ok()) return s;
  if (auto s = kept_lengths.Reserve(sizeof(int) * kept_lengths_h.size()); !s.ok()) return s;
  if (auto s = kept.Reserve(sizeof(int) * std::max<size_t>(1, total_kept)); !s.ok()) return s;
  const size_t mask_bytes = sizeof(uint64_t) * static_cast<size_t>(num_heads) * words;
  if (auto s = mask.Reserve(mask_bytes); !s.ok()) return s;
  RA_CUDA(cudaMemcpyAsync(budgets.as<void>(), budgets_h.data(), sizeof(int) * budgets_h.size(),
                          cudaMemcpyHostToDevice, stream));
  RA_CUDA(cudaMemcpyAsync(offsets.as<void>(), offsets_h.data(),
                          sizeof(long long) * offsets_h.size(), cudaMemcpyHostToDevice, stream));
  RA_CUDA(cudaMemcpyAsync(kept_lengths.as<void>(), kept_lengths_h.data(),
                          sizeof(int) * kept_lengths_h.size(), cudaMemcpyHostToDevice, stream));
  RA_CUDA(cudaMemsetAsync(mask.as<void>(), 0, mask_bytes, stream));
  RA_CUDA(k::Select(heads.as<k::HeadDesc>(), num_heads, window, stride, scores.as<float>(),
                    budgets.as<int>(), offsets.as<long long>(), words, kept.as<int>(),
                    mask.as<unsigned long long>(), stream));
  std::vector<int32_t> kept_h(total_kept);
  if (total_kept > 0) {
    RA_CUDA(cudaMemcpyAsync(kept_h.data(), kept.as<void>(), sizeof(int32_t) * total_kept,
                            cudaMemcpyDeviceToHost, stream));
  }
  RA_CUDA(cudaStreamSynchronize(stream));
  for (long long e = 0; e < num_events; ++e) {
    Decision& dec = decisions[static_cast<size_t>(e)];
    const auto begin = kept_h.begin() + offsets_h[static_cast<size_t>(e * hl)];
    std::copy(begin, begin + dec.head_offsets.back(), dec.kept_indices.begin());
  }
  return absl::OkStatus();
}

GpuEngine::GpuEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuEngine::~GpuEngine() = default;

const SessionConfig& GpuEngine::config() const { return impl_->config; }
int GpuEngine::device() const { return impl_->device; }

absl::StatusOr<std::unique_ptr<GpuEngine>> GpuEngine::Create(int device,
                                                             const SessionConfig& config,
                                                             ProfileDemand demand) {
  RETURN_IF_ERROR(ValidateSessionConfig(config));
  // Bad profiles fail here, at creation, not at the first event.
  RETURN_IF_ERROR(CheckProfileDemand(config, demand));
  auto impl = std::make_unique<Impl>();
  impl->device = device;
  impl->config = config;
  ASSIGN_OR_RETURN(impl->scorer, MakeScorer(config.scorer));
  impl->demand = std::move(demand);
  // Tests shrink the logits scratch to exercise chunked scoring.
  if (const char* v = std::getenv("REASONALLOC_GPU_LOGITS_BYTES"); v != nullptr) {
    impl->logits_bytes = std::max(1ll, std::atoll(v));
  }
  int count = 0;
  RA_CUDA(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA device ", device, " does not exist (", count, " visible)"));
  }
  RA_CUDA(cudaSetDevice(device));
  // The logits kernel holds a tile of 32 keys of head_dim floats in shared memory.
  int smem_optin = 0;
  RA_CUDA(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const long long smem = 4ll * 32 * (config.model.head_dim + 1);
  if (!PolicyOf(config.scorer.kind).cuda_kernel || !PolicyOf(config.allocator.kind).cuda) {
    return absl::UnimplementedError(
        absl::StrCat("scorer.name \"", NameOf(config.scorer.kind), "\" with allocator.name \"",
                     NameOf(config.allocator.kind), "\" has no CUDA kernels in this build"));
  }
  if (PolicyOf(config.scorer.kind).uses_queries && smem > smem_optin) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.head_dim = ", config.model.head_dim, " needs ", smem,
        " bytes of shared memory per block on the CUDA backend; this GPU allows ", smem_optin));
  }
  RA_CUDA(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking));
  return std::unique_ptr<GpuEngine>(new GpuEngine(std::move(impl)));
}

absl::StatusOr<std::vector<Decision>> GpuEngine::CompressBatch(
    std::span<const DeviceEventInputs> events, std::span<const std::string> event_names) {
  MutexLock lock(&impl_->mu);
  return impl_->Compress(events, event_names);
}

absl::Status GpuEngine::CheckEvent(const DeviceEventInputs& event) const {
  return impl_->CheckEvent(event);
}

absl::StatusOr<std::vector<std::vector<std::vector<float>>>> GpuEngine::LastScoresForTest() {
  MutexLock lock(&impl_->mu);
  Impl& x = *impl_;
  if (x.last_lengths.empty()) return absl::FailedPreconditionError("no batch has run yet");
  const long long hl = x.config.model.num_heads_total();
  const int window = x.config.budget.window;
  std::vector<float> all(x.last_lengths.size() * static_cast<size_t>(hl) *
                         static_cast<size_t>(x.last_stride));
  RA_CUDA(cudaSetDevice(x.device));
  RA_CUDA(cudaMemcpy(all.data(), x.scores.as<void>(), sizeof(float) * all.size(),
                     cudaMemcpyDeviceToHost));
  std::vector<std::vector<std::vector<float>>> out(x.last_lengths.size());
  for (size_t e = 0; e < out.size(); ++e) {
    out[e].resize(static_cast<size_t>(hl));
    for (long long head = 0; head < hl; ++head) {
      const int cand = std::max(0, x.last_lengths[e][static_cast<size_t>(head)] - window);
      const float* s = all.data() + (static_cast<long long>(e) * hl + head) * x.last_stride;
      out[e][static_cast<size_t>(head)].assign(s, s + cand);
    }
  }
  return out;
}

absl::StatusOr<std::vector<uint64_t>> GpuEngine::LastKeepMaskForTest(int e) {
  MutexLock lock(&impl_->mu);
  Impl& x = *impl_;
  if (e < 0 || e >= static_cast<int>(x.last_lengths.size())) {
    return absl::OutOfRangeError(absl::StrCat("event ", e, " is not in the last batch"));
  }
  const long long hl = x.config.model.num_heads_total();
  std::vector<uint64_t> dev(static_cast<size_t>(hl) * x.last_words);
  RA_CUDA(cudaSetDevice(x.device));
  RA_CUDA(cudaMemcpy(dev.data(),
                     x.mask.as<uint64_t>() + static_cast<long long>(e) * hl * x.last_words,
                     sizeof(uint64_t) * dev.size(), cudaMemcpyDeviceToHost));
  const int words = WordsPerHead(x.last_n_max[static_cast<size_t>(e)]);
  std::vector<uint64_t> out(static_cast<size_t>(hl) * words);
  for (long long head = 0; head < hl; ++head) {
    std::copy_n(dev.data() + head * x.last_words, words, out.data() + head * words);
  }
  return out;
}

absl::Status GpuEngine::GatherKeptForTest(std::span<const DeviceGatherTarget> targets,
                                          size_t row_bytes) {
  MutexLock lock(&impl_->mu);
  Impl& x = *impl_;
  if (targets.size() != x.last_lengths.size()) {
    return absl::InvalidArgumentError(absl::StrCat("targets has ", targets.size(),
                                                   " entries; the last batch had ",
                                                   x.last_lengths.size(), " events"));
  }
  if (row_bytes == 0) return absl::InvalidArgumentError("row_bytes must be positive");
  std::vector<k::GatherDesc> g(targets.size());
  int64_t rows = 1;
  for (size_t e = 0; e < targets.size(); ++e) {
    if (targets[e].src == nullptr || targets[e].dst == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("targets[", e, "]: src and dst are required"));
    }
    if (targets[e].max_kept < x.last_max_kept[e]) {
      return absl::InvalidArgumentError(
          absl::StrCat("targets[", e, "].max_kept = ", targets[e].max_kept, " is below the ",
                       x.last_max_kept[e], " rows a head keeps"));
    }
    g[e].src = static_cast<const unsigned char*>(targets[e].src);
    g[e].dst = static_cast<unsigned char*>(targets[e].dst);
    g[e].n_max = x.last_n_max[e];
    g[e].max_kept = targets[e].max_kept;
    rows = std::max(rows, targets[e].max_kept);
  }
  RA_CUDA(cudaSetDevice(x.device));
  if (auto s = x.gather.Reserve(sizeof(k::GatherDesc) * g.size()); !s.ok()) return s;
  RA_CUDA(cudaMemcpyAsync(x.gather.as<void>(), g.data(), sizeof(k::GatherDesc) * g.size(),
                          cudaMemcpyHostToDevice, x.stream));
  const long long hl = x.config.model.num_heads_total();
  RA_CUDA(k::Gather(x.gather.as<k::GatherDesc>(), static_cast<long long>(g.size()), hl, rows,
                    x.kept.as<int>(), x.offsets.as<long long>(), x.kept_lengths.as<int>(),
                    static_cast<long long>(row_bytes), x.stream));
  RA_CUDA(cudaStreamSynchronize(x.stream));
  return absl::OkStatus();
}

absl::Status GpuEngine::CompactInPlace(const Decision& decision,
                                       std::span<const int64_t> old_offsets,
                                       std::span<const int64_t> new_offsets, size_t row_bytes,
                                       void* k, void* v) {
  MutexLock lock(&impl_->mu);
  Impl& x = *impl_;
  const size_t heads = decision.kept_lengths.size();
  if (old_offsets.size() != heads || new_offsets.size() != heads || row_bytes == 0) {
    return absl::InvalidArgumentError("CompactInPlace: offsets must have one entry per head");
  }
  const size_t total = decision.kept_indices.size();
  if (total == 0) return absl::OkStatus();
  // Kept rows to the scratch (in head order), then to their new regions.
  std::vector<long long> lists(4 * total);
  long long* gather_src = lists.data();
  long long* gather_dst = lists.data() + total;
  long long* scatter_src = lists.data() + 2 * total;
  long long* scatter_dst = lists.data() + 3 * total;
  size_t t = 0;
  for (size_t i = 0; i < heads; ++i) {
    long long r = 0;
    for (int32_t j : decision.Kept(static_cast<int64_t>(i))) {
      gather_src[t] = old_offsets[i] + j;
      gather_dst[t] = static_cast<long long>(t);
      scatter_src[t] = static_cast<long long>(t);
      scatter_dst[t] = new_offsets[i] + r++;
      ++t;
    }
  }
  RA_CUDA(cudaSetDevice(x.device));
  if (auto s = x.row_lists.Reserve(sizeof(long long) * lists.size()); !s.ok()) return s;
  if (auto s = x.scratch.Reserve(row_bytes * total); !s.ok()) return s;
  RA_CUDA(cudaMemcpyAsync(x.row_lists.as<void>(), lists.data(), sizeof(long long) * lists.size(),
                          cudaMemcpyHostToDevice, x.stream));
  const long long* d_lists = x.row_lists.as<long long>();
  const long long n = static_cast<long long>(total);
  const long long rb = static_cast<long long>(row_bytes);
  for (void* base : {k, v}) {
    auto* b = static_cast<unsigned char*>(base);
    RA_CUDA(k::CopyRows(b, x.scratch.as<unsigned char>(), d_lists, d_lists + n, n, rb, x.stream));
    RA_CUDA(k::CopyRows(x.scratch.as<unsigned char>(), b, d_lists + 2 * n, d_lists + 3 * n, n, rb,
                        x.stream));
  }
  RA_CUDA(cudaStreamSynchronize(x.stream));
  return absl::OkStatus();
}

absl::Status GpuEngine::ReserveCompaction(int64_t rows, size_t row_bytes) {
  MutexLock lock(&impl_->mu);
  RA_CUDA(cudaSetDevice(impl_->device));
  const size_t n = static_cast<size_t>(std::max<int64_t>(rows, 1));
  if (auto s = impl_->row_lists.Reserve(4 * sizeof(long long) * n); !s.ok()) return s;
  return impl_->scratch.Reserve(row_bytes * n);
}

absl::Status GpuEngine::WaitIpcEvent(const std::string& handle) {
  if (handle.size() != sizeof(cudaIpcEventHandle_t)) {
    return absl::InvalidArgumentError(absl::StrCat("cuda_event_handle has ", handle.size(),
                                                   " bytes; a cudaIpcEventHandle_t has ",
                                                   sizeof(cudaIpcEventHandle_t)));
  }
  MutexLock lock(&impl_->mu);
  RA_CUDA(cudaSetDevice(impl_->device));
  cudaIpcEventHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  cudaEvent_t event = nullptr;
  if (cudaError_t err = cudaIpcOpenEventHandle(&event, h); err != cudaSuccess) {
    cudaGetLastError();  // not sticky: leave no error for this thread's next launch
    return absl::InvalidArgumentError(
        absl::StrCat("cuda_event_handle: cudaIpcOpenEventHandle: ", cudaGetErrorString(err)));
  }
  const cudaError_t err = cudaStreamWaitEvent(impl_->stream, event, 0);
  if (cudaEventDestroy(event) != cudaSuccess) cudaGetLastError();
  return CudaStatus("cudaStreamWaitEvent", err);
}

absl::StatusOr<void*> GpuEngine::Allocate(uint64_t bytes) {
  RA_CUDA(cudaSetDevice(impl_->device));
  void* p = nullptr;
  RA_CUDA(cudaMalloc(&p, std::max<uint64_t>(bytes, 1)));
  return p;
}

absl::Status GpuEngine::Free(void* ptr) {
  RA_CUDA(cudaSetDevice(impl_->device));
  RA_CUDA(cudaFree(ptr));
  return absl::OkStatus();
}

// On the engine's (non-blocking) stream and waited for: a plain cudaMemcpy from pageable memory
// may return before its DMA lands, and nothing would order it before the next batch's kernels.
absl::Status GpuEngine::Upload(void* dst, const void* src, uint64_t bytes) {
  MutexLock lock(&impl_->mu);
  RA_CUDA(cudaSetDevice(impl_->device));
  RA_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, impl_->stream));
  RA_CUDA(cudaStreamSynchronize(impl_->stream));
  return absl::OkStatus();
}

absl::Status GpuEngine::Download(void* dst, const void* src, uint64_t bytes) {
  MutexLock lock(&impl_->mu);
  RA_CUDA(cudaSetDevice(impl_->device));
  RA_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, impl_->stream));
  RA_CUDA(cudaStreamSynchronize(impl_->stream));
  return absl::OkStatus();
}

}  // namespace reasonalloc::gpu
